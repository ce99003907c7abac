"""DINOLoss against float64 transcriptions of lightly's DINO loss and of the authors' code: value,
student gradient, the teacher-temperature warm-up and the center update, one process and two.

Transcribed from lightly-ai/lightly at e8d317fc: lightly/loss/dino_loss.py (DINOLoss.forward,
update_center) and lightly/models/modules/center.py (center_mean, center_momentum); the
temperature schedule and the all-reduced center from facebookresearch/dino at 7c446df5,
main_dino.py (DINOLoss.__init__, update_center).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from suncet.losses import DINOLoss

DIM = 11


def crops(count, rows=5, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(rows, DIM, generator=g, dtype=dtype) for _ in range(count)]


def lightly_dino(teacher_out, student_out, center, teacher_temp, student_temp, center_momentum):
    """lightly's DINOLoss.forward as loops over crop pairs and rows (the einsum's diagonal, the
    same crop index, left out), and its center update; returns (loss, new center [D])."""
    total, terms = 0.0, 0
    rows = teacher_out[0].shape[0]
    for i, t in enumerate(teacher_out):
        for j, s in enumerate(student_out):
            if i == j:
                continue
            terms += 1
            for b in range(rows):
                q = torch.softmax((t[b] - center) / teacher_temp, dim=0)
                log_p = torch.log_softmax(s[b] / student_temp, dim=0)
                total = total - (q * log_p).sum()
    loss = total / (terms * rows)
    batch_center = sum(t.sum(dim=0) for t in teacher_out) / (len(teacher_out) * rows)
    return loss, center * center_momentum + batch_center * (1 - center_momentum)


def student_gradient(teacher_out, student_out, center, teacher_temp, student_temp):
    """d loss / d student_out[j][b] by hand: (n_j softmax(s / T_s) - sum of the n_j targets
    compared with it) / (T_s x pairs x rows), n_j the teacher crops other than j."""
    rows = teacher_out[0].shape[0]
    targets = [torch.softmax((t - center) / teacher_temp, dim=1) for t in teacher_out]
    pairs = sum(1 for i in range(len(teacher_out)) for j in range(len(student_out)) if i != j)
    grads = []
    for j, s in enumerate(student_out):
        others = [q for i, q in enumerate(targets) if i != j]
        p = torch.softmax(s / student_temp, dim=1)
        grads.append((len(others) * p - sum(others, torch.zeros_like(p))) / (student_temp * pairs * rows))
    return grads


@pytest.mark.parametrize("teachers,students", [(2, 2), (2, 6), (1, 3)])
def test_value_gradient_and_center_equal_lightlys_formula(teachers, students):
    loss_fn = DINOLoss(DIM, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=5).double()
    teacher = crops(teachers, seed=1, scale=0.3)
    student = [s.requires_grad_() for s in crops(students, seed=2)]
    center = torch.randn(DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.1
    loss_fn.center.copy_(center)
    temperature = 0.04 + 0.03 * 2 / 4  # epoch 2 of a 5-epoch warm-up from 0.04 to 0.07
    want, want_center = lightly_dino(teacher, student, center, temperature, 0.1, 0.9)
    got = loss_fn(teacher, student, epoch=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_fn.center.view(-1), want_center, rtol=1e-12, atol=1e-12)
    got.backward()
    by_hand = student_gradient(teacher, student, center, temperature, 0.1)
    reference = lightly_dino(teacher, student, center, temperature, 0.1, 0.9)[0]
    # With one teacher crop, student crop 0 is that crop's own view: compared with nothing.
    autograd = torch.autograd.grad(reference, student, allow_unused=True, materialize_grads=True)
    for s, hand, auto in zip(student, by_hand, autograd):
        torch.testing.assert_close(s.grad, hand, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s.grad, auto, rtol=1e-10, atol=1e-12)


def test_the_teacher_is_a_target_without_gradient():
    teacher = [t.requires_grad_() for t in crops(2, seed=1)]
    student = [s.requires_grad_() for s in crops(4, seed=2)]
    DINOLoss(DIM).double()(teacher, student).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)


def test_teacher_temperature_warms_up_as_the_authors_schedule():
    epochs, warmup = 12, 5
    schedule = np.concatenate((np.linspace(0.04, 0.07, warmup), np.ones(epochs - warmup) * 0.07))
    loss_fn = DINOLoss(DIM, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=warmup)
    for epoch in range(epochs):
        assert loss_fn.teacher_temperature(epoch) == pytest.approx(schedule[epoch], abs=1e-15)
    assert loss_fn.teacher_temperature() == 0.07
    one = DINOLoss(DIM, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=1)
    assert (one.teacher_temperature(0), one.teacher_temperature(1)) == (0.04, 0.07)  # np.linspace(a, b, 1) == [a]
    # A temperature passed to the call wins over the epoch's.
    teacher, student = crops(2, seed=1), crops(3, seed=2)
    fixed = DINOLoss(DIM).double()
    want, _ = lightly_dino(teacher, student, torch.zeros(DIM, dtype=torch.float64), 0.05, 0.1, 0.9)
    torch.testing.assert_close(fixed(teacher, student, teacher_temp=0.05, epoch=0), want, rtol=1e-12, atol=0)


def test_center_moves_only_in_training_mode_and_travels_in_the_state_dict():
    loss_fn = DINOLoss(DIM).double()
    teacher, student = crops(2, seed=1), crops(2, seed=2)
    loss_fn.eval()
    first = loss_fn(teacher, student)
    assert torch.equal(loss_fn.center, torch.zeros(1, 1, DIM, dtype=torch.float64))
    assert torch.equal(loss_fn(teacher, student), first)
    loss_fn.train()
    loss_fn(teacher, student)
    loss_fn(crops(2, seed=5), student)
    restored = DINOLoss(DIM).double()
    restored.load_state_dict(loss_fn.state_dict())
    assert set(loss_fn.state_dict()) == {"center"} and torch.equal(restored.center, loss_fn.center)
    assert torch.equal(restored.eval()(teacher, student), loss_fn.eval()(teacher, student))


def test_low_precision_outputs_give_an_fp32_loss_and_keep_the_fp32_center():
    loss_fn = DINOLoss(DIM)
    teacher, student = crops(2, seed=1, dtype=torch.bfloat16), crops(3, seed=2, dtype=torch.bfloat16)
    loss = loss_fn(teacher, student)
    want, want_center = lightly_dino(
        [t.double() for t in teacher],
        [s.double() for s in student],
        torch.zeros(DIM, dtype=torch.float64),
        0.04,
        0.1,
        0.9,
    )
    assert loss.dtype == torch.float32 and loss_fn.center.dtype == torch.float32
    assert abs(loss.item() - want.item()) < 1e-5 * abs(want.item())
    torch.testing.assert_close(loss_fn.center.view(-1).double(), want_center, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("where", ["teacher", "global student", "local student"])
def test_a_nan_in_any_compared_crop_makes_the_loss_nan(where):
    teacher, student = crops(2, seed=1), crops(4, seed=2)
    crop = {"teacher": teacher[0], "global student": student[1], "local student": student[3]}[where]
    crop[2, 4] = float("nan")
    assert torch.isnan(DINOLoss(DIM).double()(teacher, student))


def refused(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"output_dim": 0}, "^output_dim must be an integer >= 1"),
        ({"output_dim": 8.0}, "^output_dim must be an integer >= 1"),
        ({"teacher_temp": 0.0}, "^teacher_temp must be a finite number >= 0.001"),
        ({"warmup_teacher_temp": float("nan")}, "^warmup_teacher_temp must be a finite number"),
        ({"student_temp": True}, "^student_temp must be a real number"),
        ({"warmup_teacher_temp_epochs": -1}, "^warmup_teacher_temp_epochs must be an integer >= 0"),
        ({"center_momentum": 1.5}, r"^center_momentum must be in \[0, 1\]"),
        ({"center_mode": "median"}, "^center_mode must be one of 'mean'"),
    ],
)
def test_bad_settings_are_refused_naming_the_argument(kwargs, pattern):
    refused(lambda: DINOLoss(**{"output_dim": DIM, **kwargs}), pattern)


def test_bad_calls_are_refused_naming_the_argument():
    loss_fn = DINOLoss(DIM)
    teacher, student = crops(2, dtype=torch.float32), crops(3, dtype=torch.float32)
    refused(lambda: loss_fn(teacher, [student[0], student[1][:, :4]]), r"^student_out\[1\] must have 11 columns")
    refused(lambda: loss_fn([teacher[0].long(), teacher[1]], student), r"^teacher_out\[0\] must be a floating-point")
    refused(lambda: loss_fn(teacher, [student[0], student[1][:3]]), r"^student_out\[1\] must have 5 rows")
    refused(lambda: loss_fn([teacher[0]], [student[0]]), "needs a teacher crop and two crops in all, got 1 teacher")
    refused(lambda: loss_fn([], student), "got 0 teacher and 3 student")
    refused(lambda: loss_fn(teacher, student, epoch=-1), "^epoch must be an integer >= 0")
    refused(lambda: loss_fn(teacher, student, teacher_temp=math.inf), "^teacher_temp must be a finite number")
    assert torch.isfinite(loss_fn([teacher[0]], student[:2]))  # one teacher crop, one other student crop


# ---------------------------------------------------------------------------------------------
# Under torch.distributed the center is the mean over every rank's teacher rows (the authors'
# dist.all_reduce); the loss itself is each rank's own.

WORLD = 2


def rank_worker(r, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD)
    teacher, student = crops(2, rows=6, seed=1), crops(3, rows=6, seed=2)
    loss_fn = DINOLoss(DIM).double()
    loss = loss_fn([t[3 * r : 3 * r + 3] for t in teacher], [s[3 * r : 3 * r + 3] for s in student])
    results.put((r, loss.item(), loss_fn.center.view(-1).tolist()))
    dist.destroy_process_group()


def test_two_ranks_move_the_center_by_the_whole_batchs_mean(tmp_path):
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=rank_worker, args=(r, tmp_path / "init", results)) for r in range(WORLD)]
    for p in processes:
        p.start()
    gathered = {r: (loss, center) for r, loss, center in (results.get(timeout=300) for _ in processes)}
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    teacher, student = crops(2, rows=6, seed=1), crops(3, rows=6, seed=2)
    zero = torch.zeros(DIM, dtype=torch.float64)
    _, want_center = lightly_dino(teacher, student, zero, 0.04, 0.1, 0.9)
    for r in range(WORLD):
        own, _ = lightly_dino(
            [t[3 * r : 3 * r + 3] for t in teacher], [s[3 * r : 3 * r + 3] for s in student], zero, 0.04, 0.1, 0.9
        )
        loss, center = gathered[r]
        assert loss == pytest.approx(own.item(), rel=1e-12)
        torch.testing.assert_close(torch.tensor(center, dtype=torch.float64), want_center, rtol=1e-12, atol=1e-14)


def test_torch_compile_traces_it_in_one_graph_center_update_included():
    teacher, student = crops(2, dtype=torch.float32), [s.requires_grad_() for s in crops(4, dtype=torch.float32)]
    compiled, eager = DINOLoss(DIM), DINOLoss(DIM)
    got = torch.compile(lambda t, s: compiled(t, s, epoch=0), fullgraph=True)(teacher, student)
    want = eager(teacher, [s.detach() for s in student], epoch=0)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled.center, eager.center, rtol=1e-6, atol=1e-7)
    assert all(s.grad is not None for s in student)
