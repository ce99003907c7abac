"""The triton backend as a user's loop on a GPU meets it, checked in the Triton interpreter:
losses modified in place, half-precision inputs against float64, fp16 gradients of a mean at
magnitudes where the gradient tile would underflow, launches under the operands' device, CUDA
graph capture (no plan shared, no autotuning), autotuning keyed by row buckets, plan memory.

The interpreter runs where no GPU is (TRITON_INTERPRET=1, fp32 accumulation; the conftest shim
widens half-precision dot operands as a tensor core does); the test at the end reruns this file's
interpreter tests in a subprocess. On a card, benchmarks/gpu_check.sh runs the gpu-marked
tests before it: the same defects compiled (in place, fp16 at 8192 rows, two CUDA graph
captures, a second device).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import rerun_under_triton_interpreter, skip_unless_triton_interpreter

from suncet import kernels
from suncet.losses import MultiPositiveContrastiveLoss, NTXentLoss, NTXentSuNCEtLoss, SuNCEtLoss


@pytest.fixture
def launch():
    skip_unless_triton_interpreter()
    kernels.backend_status.cache_clear()
    from suncet.kernels import triton_launch

    triton_launch.set_fp32_precision("ieee")
    yield triton_launch
    triton_launch.set_fp32_precision("tf32")


def _rows(rows: int, dim: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


LABELS = torch.tensor([0, 1, 1, 2, 0, 3, 2, 2, 1, 0])


def _calls(backend: str, dtype=torch.float32):
    """Each contrastive module with inputs, and how its value(s) become one loss."""
    out0, out1, labeled = (_rows(8, 16, seed, dtype) for seed in (1, 2, 3))
    labeled = _rows(10, 16, 3, dtype)
    return {
        "ntxent": (NTXentLoss(0.2, backend=backend), (out0, out1)),
        "suncet": (SuNCEtLoss(0.2, backend=backend), (labeled, LABELS)),
        "ntxent_suncet": (NTXentSuNCEtLoss(0.2, backend=backend), (out0, out1, labeled, LABELS)),
        "multi_positive": (MultiPositiveContrastiveLoss(0.2, backend=backend), (out0, LABELS[:8], out1, LABELS[2:])),
    }


def _leaves(inputs):
    return [x.detach().clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs]


def _check_in_place(device: str) -> None:
    # loss += other, loss /= steps, loss.mul_(w): each returned loss is a tensor of its own, and
    # the gradient equals the out-of-place form's.
    for name, (module, inputs) in _calls("triton").items():
        inputs = [x.to(device) for x in inputs]
        leaves = _leaves(inputs)
        values = module(*leaves)
        values = values if isinstance(values, tuple) else (values,)
        loss = values[0]
        for extra in values[1:]:
            loss += extra
        loss /= 4
        loss.mul_(0.5)
        loss += leaves[0].sum() * 0
        got = torch.autograd.grad(loss, [x for x in leaves if x.requires_grad])
        leaves = _leaves(inputs)
        values = module(*leaves)
        values = values if isinstance(values, tuple) else (values,)
        want_loss = sum(values) / 4 * 0.5
        want = torch.autograd.grad(want_loss, [x for x in leaves if x.requires_grad])
        torch.testing.assert_close(loss.detach(), want_loss.detach(), msg=name)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, msg=name)


def test_interpreted_losses_may_be_modified_in_place(launch):
    _check_in_place("cpu")


def _value_and_grad(module, inputs, dtype, weight=1.0):
    leaves = [x.detach().to(dtype).requires_grad_(True) if x.is_floating_point() else x for x in inputs]
    values = module(*leaves)
    total = sum(values) if isinstance(values, tuple) else values
    grads = torch.autograd.grad(total * weight, [x for x in leaves if x.requires_grad])
    return total.double(), [g.double() for g in grads]


def _errors(got, want):
    value = ((got[0] - want[0]).abs() / want[0].abs()).item()
    grad = max(((g - w).norm() / w.norm()).item() for g, w in zip(got[1], want[1]))
    return value, grad


# Relative errors against float64 on the raw inputs. The rows reach the kernels rounded to the
# input dtype, which bounds every backend's error (bf16: about 1e-3 in value, 4e-3 to 6e-3 in the
# gradient here; fp16: 3e-5 and 6e-4); values (fp32 sums) must then match the cpu backend's to
# within 2x. The triton kernels also round the gradient tile to the input dtype before their
# second product, and the interpreter truncates there where a card rounds to nearest: its bf16
# gradients come out within 2.5x of the cpu backend's (which keeps that tile in fp32), its fp16
# ones within 1.5x.
GRADIENT_FACTOR = {torch.bfloat16: 2.5, torch.float16: 1.5}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreted_half_precision_modules_match_float64(launch, dtype):
    want_calls, got_calls = _calls("reference", torch.float64), _calls("triton", torch.float64)
    cpu_calls = _calls("cpu", torch.float64)
    for name in want_calls:
        want = _value_and_grad(*want_calls[name], torch.float64)
        got = _errors(_value_and_grad(*got_calls[name], dtype), want)
        cpu = _errors(_value_and_grad(*cpu_calls[name], dtype), want)
        assert got[0] <= 2 * cpu[0] + 1e-6 and got[0] <= 2e-3, (name, got, cpu)
        assert got[1] <= GRADIENT_FACTOR[dtype] * cpu[1] and got[1] <= 1e-2, (name, got, cpu)


def test_interpreted_fp16_gradients_of_a_mean_keep_their_small_entries(launch):
    # A mean's gradient entries are about weight / N^2: at N = 8192 far below fp16's normals. At
    # 128 rows with the mean weighted by 1e-3 (as a loss divided over accumulation steps) they
    # are as small, while the gradient itself stays representable. The fp16 error must stay
    # within 2x of the cpu backend's on the same inputs (which keeps those entries in fp32).
    rows = 128
    x = _rows(rows, 32, 5)
    labels = torch.randint(0, 10, (rows // 2,), generator=torch.Generator().manual_seed(5))
    inputs = (x[:32], x[32:64], x[64:], labels)
    for tau in (0.5, 0.1):
        want = _value_and_grad(NTXentSuNCEtLoss(tau, backend="reference"), inputs, torch.float64, 1e-3)
        got = _errors(_value_and_grad(NTXentSuNCEtLoss(tau, backend="triton"), inputs, torch.float16, 1e-3), want)
        cpu = _errors(_value_and_grad(NTXentSuNCEtLoss(tau, backend="cpu"), inputs, torch.float16, 1e-3), want)
        assert got[1] <= 2 * cpu[1], (tau, got, cpu)


def _problem(rows=40, dim=16, sets=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(rows, dim, generator=gen), dim=1)
    keys = torch.randint(0, 4, (rows, sets), generator=gen)
    return z, kernels.Layout.of(keys, one_tower=True, boundary=rows // 2)


def test_interpreted_every_entry_point_launches_on_the_operands_device(launch, monkeypatch):
    # Triton launches on the current CUDA device: with the operands elsewhere, each entry point
    # must enter torch.cuda.device(operands' device) around its launches.
    z, layout = _problem()
    entered = []

    @contextlib.contextmanager
    def device(where):
        entered.append(where)
        monkeypatch.setattr(launch, "_elsewhere", lambda d: False)  # now on it
        yield

    def elsewhere_once():
        monkeypatch.setattr(launch, "_elsewhere", lambda d: True)

    monkeypatch.setattr(torch.cuda, "device", device)
    calls = {
        "forward": lambda: launch.forward(z, z, layout, 0.1),
        "forward_mean": lambda: launch.forward_mean(z, z, layout, 0.1),
    }
    loss, valid, stats = launch.forward(z, z, layout, 0.1)
    means, mean_stats = launch.forward_mean(z, z, layout, 0.1)
    ones = torch.ones_like(loss)
    calls["backward"] = lambda: launch.backward(ones, z, z, layout, 0.1, stats)
    calls["backward_mean"] = lambda: launch.backward_mean(
        [torch.ones(()), torch.ones(())], z, z, layout, 0.1, mean_stats
    )
    for name, call in calls.items():
        want = call()
        entered.clear()
        elsewhere_once()
        got = call()
        assert entered == [z.device], name
        for g, w in zip(got, want):
            if isinstance(g, torch.Tensor):
                assert torch.equal(g, w), name


def test_interpreted_graph_capture_plans_afresh_and_never_autotunes(launch, monkeypatch):
    # While a CUDA graph is captured, a plan made then belongs to that graph alone (its tickets
    # are zeroed only inside it), and the autotuner must not run (its timing synchronises): the
    # launcher takes the tile chosen eagerly for the bucket, or the table's first.
    z, layout = _problem(seed=1)
    want = launch.forward_mean(z, z, layout, 0.1)[0]
    monkeypatch.setattr(launch, "_PLANS", type(launch._PLANS)())
    monkeypatch.setattr(launch, "capturing", lambda device: True)
    for kernel in (launch.kernels.forward_kernel, launch.kernels.backward_kernel):
        monkeypatch.setattr(kernel, "run", lambda *a, **k: pytest.fail("the autotuner ran during capture"))
    means, stats = launch.forward_mean(z, z, layout, 0.1)
    launch.backward_mean([torch.ones(()), torch.ones(())], z, z, layout, 0.1, stats)
    assert len(launch._PLANS) == 0
    for g, w in zip(means, want):
        assert torch.equal(g, w)


def test_interpreted_autotuning_is_keyed_by_row_buckets(launch):
    from suncet.kernels import triton_kernels

    for kernel in (triton_kernels.forward_kernel, triton_kernels.backward_kernel):
        assert "M" not in kernel.keys and "N" not in kernel.keys
        assert {"ROWS_BUCKET", "COLS_BUCKET"} <= set(kernel.keys)
    launch._CHOSEN.clear()
    for rows in (40, 48, 64):  # one bucket: 64 rows
        z, layout = _problem(rows=rows)
        launch.forward_mean(z, z, layout, 0.1)
    assert len([key for key in launch._CHOSEN if key[0] is triton_kernels.forward_kernel]) == 1
    z, layout = _problem(rows=65)  # the next bucket
    launch.forward_mean(z, z, layout, 0.1)
    assert len([key for key in launch._CHOSEN if key[0] is triton_kernels.forward_kernel]) == 2


def test_interpreted_plans_are_bounded_by_their_bytes(launch, monkeypatch):
    monkeypatch.setattr(launch, "_PLANS", type(launch._PLANS)())
    z, layout = _problem(rows=40)
    launch.forward_mean(z, z, layout, 0.1)
    (plan,) = launch._PLANS.values()
    monkeypatch.setattr(launch, "MAX_PLAN_BYTES", int(2.5 * plan.nbytes))
    for tau in (0.2, 0.3, 0.4, 0.5):
        launch.forward_mean(z, z, layout, tau)
    assert len(launch._PLANS) == 2
    assert sum(kept.nbytes for kept in launch._PLANS.values()) <= launch.MAX_PLAN_BYTES
    assert [key[6] for key in launch._PLANS] == [0.4, 0.5]  # the most recent kept


# The same defects compiled, on a card (benchmarks/gpu_check.sh runs the gpu-marked tests).
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@needs_cuda
def test_on_a_gpu_losses_may_be_modified_in_place():
    _check_in_place("cuda")


@gpu
@needs_cuda
def test_on_a_gpu_fp16_gradients_of_a_mean_over_8192_rows_stay_within_2x_of_the_cpu_backend():
    # The entries of a mean's gradient tile are about 1/N^2, below fp16's normals at N = 8192
    # (NT-Xent's rows here): the tile is scaled per row before its cast.
    x = _rows(12288, 128, 7)
    labels = torch.randint(0, 100, (4096,), generator=torch.Generator().manual_seed(7))
    inputs = (x[:4096], x[4096:8192], x[8192:], labels)
    on_gpu = [t.cuda() for t in inputs]
    for tau in (0.5, 0.1):
        want = _value_and_grad(NTXentSuNCEtLoss(tau, backend="reference"), on_gpu, torch.float64)
        got = _value_and_grad(NTXentSuNCEtLoss(tau, backend="triton"), on_gpu, torch.float16)
        cpu = _value_and_grad(NTXentSuNCEtLoss(tau, backend="cpu"), inputs, torch.float16)
        want = (want[0].cpu(), [g.cpu() for g in want[1]])
        got_errors = _errors((got[0].cpu(), [g.cpu() for g in got[1]]), want)
        cpu_errors = _errors(cpu, want)
        assert got_errors[1] <= 2 * cpu_errors[1], (tau, got_errors, cpu_errors)


@gpu
@needs_cuda
def test_on_a_gpu_steps_captured_in_two_cuda_graphs_replay_the_eager_values():
    # Two captures of two shapes (each plans afresh, neither autotunes while capturing), each
    # replayed on new inputs and compared with the same step run eagerly.
    for rows in (256, 512):
        module = NTXentLoss(0.2, backend="triton")
        gen = torch.Generator().manual_seed(rows)
        a, b = (torch.randn(rows, 64, generator=gen).cuda().requires_grad_(True) for _ in range(2))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                torch.autograd.grad(module(a, b), (a, b))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = module(a, b)
            grads = torch.autograd.grad(loss, (a, b))
        for seed in (1, 2):
            with torch.no_grad():
                a.copy_(torch.randn(rows, 64, generator=gen))
                b.copy_(torch.randn(rows, 64, generator=gen))
            graph.replay()
            torch.cuda.synchronize()
            fresh = [a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)]
            want_loss = module(*fresh)
            want = torch.autograd.grad(want_loss, fresh)
            torch.testing.assert_close(loss, want_loss, msg=f"{rows} rows, replay {seed}")
            for g, w in zip(grads, want):
                torch.testing.assert_close(g, w, msg=f"{rows} rows, replay {seed}")


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_on_a_second_gpu_every_module_computes_there_while_the_first_is_current():
    with torch.cuda.device(0):
        for name, (module, inputs) in _calls("triton").items():
            first = _value_and_grad(module, [x.to("cuda:0") for x in inputs], torch.float32)
            second = _value_and_grad(module, [x.to("cuda:1") for x in inputs], torch.float32)
            assert all(g.device == torch.device("cuda:1") for g in second[1]), name
            torch.testing.assert_close(second[0].cpu(), first[0].cpu(), msg=name)
            for g, w in zip(second[1], first[1]):
                torch.testing.assert_close(g.cpu(), w.cpu(), msg=name)


def test_launch_tests_rerun_under_the_interpreter():
    rerun_under_triton_interpreter(__file__, "interpreted", passed=8)
