"""The fused multi-positive contrastive kernels against float64 loops written here.

The oracle below loops over rows and columns in plain Python/NumPy float64; it shares no
code with suncet.kernels.reference. CPU runs cover the cpu backend and, when no GPU is
present, the triton backend in the Triton interpreter (fp32, ieee dots, small sizes).
GPU-only checks are marked ``gpu`` and run on the device machine (benchmarks/gpu_check.sh).

Triton picks the interpreter when ``triton.language`` is first imported, so unless this process
already interprets (TRITON_INTERPRET=1 set before it started), the interpreter tests rerun
themselves in a subprocess that sets it; the session's environment is left alone.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    check_losses_keep_non_finite,
    check_rows_that_see_a_non_finite_row_are_nan,
    rerun_under_triton_interpreter,
    skip_unless_triton_interpreter,
)

from suncet import kernels
from suncet.errors import ConfigError
from suncet.kernels import Layout
from suncet.kernels import cpu as kernel_cpu

CPU_STATUS = kernels.backend_status()["cpu"]
needs_cpu_kernels = pytest.mark.skipif(not CPU_STATUS[0], reason=CPU_STATUS[1])
CPU_VARIANTS = kernel_cpu.variants() if CPU_STATUS[0] else ["unbuilt"]


@pytest.fixture(params=CPU_VARIANTS)
def cpu_variant(request):
    """Runs the test once per instruction-set variant this processor supports."""
    running = kernel_cpu.variant()
    kernel_cpu.set_variant(request.param)
    yield request.param
    kernel_cpu.set_variant(running)


# ---------------------------------------------------------------------------------------------
# The oracle.


def _lse(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def oracle(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, grad):
    """float64 (loss [M, P], valid [M, P], dq [M, D], dk [N, D]) for upstream gradient ``grad``."""
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    row_keys, col_keys = np.asarray(row_keys).reshape(len(q), -1), np.asarray(col_keys).reshape(len(k), -1)
    row_groups, col_groups = np.asarray(row_groups), np.asarray(col_groups)
    grad = np.asarray(grad, dtype=np.float64).reshape(len(q), -1)
    rows, cols, sets = len(q), len(k), row_keys.shape[1]
    loss = np.zeros((rows, sets))
    valid = np.zeros((rows, sets), dtype=bool)
    g_s = np.zeros((rows, cols))  # d(sum_ip grad_ip loss_ip) / d s_ij
    for i in range(rows):
        s = {}
        for j in range(cols):
            if row_groups[i] == col_groups[j] and j != i + self_offset:
                s[j] = float(np.dot(q[i], k[j])) / tau
        for p in range(sets):
            positives = {j for j in s if row_keys[i, p] == col_keys[j, p]}
            if not positives:
                continue
            lse_all = _lse(list(s.values()))
            lse_pos = _lse([s[j] for j in positives])
            loss[i, p] = lse_all - lse_pos
            valid[i, p] = True
            for j, sij in s.items():
                g_s[i, j] += grad[i, p] * (
                    math.exp(sij - lse_all) - (math.exp(sij - lse_pos) if j in positives else 0.0)
                )
    return loss, valid, g_s @ k / tau, g_s.T @ q / tau


# ---------------------------------------------------------------------------------------------
# The operation with loose arguments, as these tests write problems: k is q for one tower, 1-D
# keys give per-row outputs [M].


def layout_of(q, k, rk, ck, rg, cg, offset, boundary=None):
    return Layout.of(rk, ck, rg, cg, self_offset=offset, one_tower=k is q, boundary=boundary)


def per_row(q, k, rk, ck, rg, cg, offset, tau, backend="auto"):
    loss, valid = kernels.multi_positive(
        q, None if k is q else k, layout_of(q, k, rk, ck, rg, cg, offset), tau, backend
    )
    return (loss[:, 0], valid[:, 0]) if rk.dim() == 1 else (loss, valid)


def means_of(q, k, rk, ck, rg, cg, offset, tau, boundary=None, backend="auto"):
    return kernels.multi_positive_mean(
        q, None if k is q else k, layout_of(q, k, rk, ck, rg, cg, offset, boundary), tau, backend
    )


# ---------------------------------------------------------------------------------------------
# Problems.


def _unit(rows: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)


def make_problem(layout: str, rows: int, dim: int, sets: int, gen: torch.Generator, classes: int = 4):
    """(q, k or None for one tower, row_keys, col_keys, row_groups, col_groups, self_offset)."""
    keys = lambda n: torch.randint(0, classes, (n, sets), generator=gen)  # noqa: E731
    if layout == "one_tower":
        q = _unit(rows, dim, gen)
        rk = keys(rows)
        groups = torch.zeros(rows, dtype=torch.long)
        return q, None, rk, rk, groups, groups, 0
    if layout == "two_block":
        # [unlabeled views; labeled]: NT-Xent ids in group 0, classes in group 1.
        q = _unit(rows, dim, gen)
        half = rows // 2 - (rows // 2) % 2
        ids = torch.arange(half) % (half // 2)
        rk = torch.cat([ids[:, None].expand(half, sets), keys(rows - half)])
        groups = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(rows - half, dtype=torch.long)])
        return q, None, rk.contiguous(), rk.contiguous(), groups, groups, 0
    if layout == "cross":
        # Local rows against columns gathered from 3 ranks; this rank is rank 1.
        q = _unit(rows, dim, gen)
        others = _unit(2 * rows, dim, gen)
        k = torch.cat([others[:rows], q, others[rows:]])
        rk = keys(rows)
        ck = torch.cat([keys(rows), rk, keys(rows)])
        return q, k, rk, ck, torch.zeros(rows, dtype=torch.long), torch.zeros(3 * rows, dtype=torch.long), rows
    raise ValueError(layout)


def run_backend(backend, q, k, rk, ck, rg, cg, offset, tau, grad):
    """Loss, valid, dq, dk through kernels.multi_positive (custom op and autograd glue)."""
    q = q.detach().clone().requires_grad_(True)
    k_in = q if k is None else k.detach().clone().requires_grad_(True)
    loss, valid = per_row(q, k_in, rk, ck, rg, cg, offset, tau, backend=backend)
    inputs = (q,) if k is None else (q, k_in)
    grads = torch.autograd.grad(loss, inputs, grad_outputs=grad.to(loss.device, loss.dtype).reshape(loss.shape))
    return loss.detach(), valid, grads[0], (None if k is None else grads[1])


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def check_against_oracle(backend, layout, rows, dim, sets, tau, seed, dtype=torch.float32, tol=1e-4):
    gen = torch.Generator().manual_seed(seed)
    q, k, rk, ck, rg, cg, offset = make_problem(layout, rows, dim, sets, gen)
    q, k = q.to(dtype), (None if k is None else k.to(dtype))
    grad = torch.randn(rows, sets, generator=gen, dtype=torch.float64)
    keys_in = (rk[:, 0], ck[:, 0]) if sets == 1 else (rk, ck)
    loss, valid, dq, dk = run_backend(backend, q, k, *keys_in, rg, cg, offset, tau, grad)
    want = oracle(q.double(), q.double() if k is None else k.double(), rk, ck, rg, cg, offset, tau, grad)
    want_dq = want[2] + want[3] if k is None else want[2]
    loss, valid = loss.reshape(rows, sets), valid.reshape(rows, sets)
    assert torch.isfinite(loss).all() and torch.isfinite(dq).all()
    np.testing.assert_array_equal(valid.numpy(), want[1])
    assert np.abs(loss.double().numpy() - want[0]).max() <= tol * max(1.0, np.abs(want[0]).max())
    assert rel(dq.double().numpy(), want_dq) <= tol
    if k is not None:
        assert torch.isfinite(dk).all()
        assert rel(dk.double().numpy(), want[3]) <= tol


# ---------------------------------------------------------------------------------------------
# cpu backend.

CPU_CASES = [
    # layout, rows, dim, sets, tau
    ("one_tower", 53, 3, 1, 0.1),
    ("one_tower", 300, 64, 2, 0.05),
    ("one_tower", 97, 130, 1, 0.5),
    ("two_block", 122, 128, 1, 0.1),
    ("two_block", 60, 64, 2, 0.05),
    ("cross", 45, 128, 1, 0.1),
    ("cross", 37, 130, 2, 0.5),
]


@needs_cpu_kernels
@pytest.mark.parametrize("layout,rows,dim,sets,tau", CPU_CASES)
def test_cpu_matches_float64_loops(layout, rows, dim, sets, tau, cpu_variant):
    check_against_oracle("cpu", layout, rows, dim, sets, tau, seed=rows * 7 + dim)


@needs_cpu_kernels
@pytest.mark.parametrize("layout", ["one_tower", "cross"])
def test_cpu_bf16_inputs_accumulate_in_fp32(layout, cpu_variant):
    # bf16 inputs are exact in fp32: results are fp32-accurate on the rounded inputs, and the
    # gradient comes back in bf16 (one rounding).
    check_against_oracle("cpu", layout, 70, 128, 2, 0.1, seed=3, dtype=torch.bfloat16, tol=1e-2)


@needs_cpu_kernels
@pytest.mark.parametrize("layout", ["one_tower", "cross"])
def test_cpu_float64_gradcheck(layout, cpu_variant):
    # fp64 inputs run the same tiled C++ code in fp64, so finite differences are meaningful.
    gen = torch.Generator().manual_seed(11)
    q, k, rk, ck, rg, cg, offset = make_problem(layout, 9, 5, 2, gen, classes=3)
    q.requires_grad_(True)
    if k is None:
        fn = lambda q: per_row(q, q, rk, ck, rg, cg, offset, 0.3, backend="cpu")[0]  # noqa: E731
        torch.autograd.gradcheck(fn, (q,))
    else:
        k.requires_grad_(True)
        fn = lambda q, k: per_row(q, k, rk, ck, rg, cg, offset, 0.3, backend="cpu")[0]  # noqa: E731
        torch.autograd.gradcheck(fn, (q, k))


def _special_rows():
    # Row 0: a singleton class (no positive). Rows 1-3: one class, all-positive among them
    # (with group 1 they see only each other). Row 4: alone in its group (sees nothing).
    gen = torch.Generator().manual_seed(5)
    q = _unit(12, 16, gen)
    keys = torch.tensor([[100], [7], [7], [7], [8], [1], [1], [2], [2], [3], [3], [1]])
    groups = torch.tensor([0, 1, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0])
    return q, keys, groups


def check_special_rows(backend, tau=0.1, device="cpu"):
    q, keys, groups = _special_rows()
    q = q.float().to(device).requires_grad_(True)
    keys, groups = keys[:, 0].to(device), groups.to(device)
    loss, valid = per_row(q, q, keys, keys, groups, groups, 0, tau, backend=backend)
    loss, valid = loss.cpu(), valid.cpu()
    assert valid[0].item() is False and loss[0].item() == 0.0
    assert valid[1:4].all() and torch.allclose(loss[1:4], torch.zeros(3), atol=1e-6)
    assert valid[4].item() is False and loss[4].item() == 0.0
    (loss * torch.arange(1.0, 13.0)).sum().backward()
    grad = q.grad.cpu()
    assert torch.isfinite(grad).all()
    # Rows 0 and 4 neither receive gradient through their own loss nor appear in anyone's
    # denominator except group 0 (row 0): row 4 is isolated entirely.
    assert torch.count_nonzero(grad[4]) == 0
    assert torch.allclose(grad[1:4], torch.zeros(3, 16), atol=1e-6)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernels), "reference"])
def test_rows_without_positives_all_positive_and_isolated(backend):
    check_special_rows(backend)


def check_extreme_temperatures(backend, taus, device="cpu"):
    # Each row's positive is antipodal to it while every negative is the row itself: the loss is
    # about 2/tau + log(n), far beyond exp's range in fp32 at tau = 0.01, yet finite and exact.
    base = F.normalize(torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), dim=1)
    q = torch.cat([base, -base, base, base])
    keys = torch.cat([torch.arange(6), torch.arange(6), 100 + torch.arange(12)])
    groups = torch.zeros(24, dtype=torch.long)
    for tau in taus:
        grad = torch.ones(24, 1, dtype=torch.float64)
        on = [t.to(device) for t in (q.float(), keys, groups)]
        loss, valid, dq, _ = run_backend(backend, on[0], None, on[1], on[1], on[2], on[2], 0, tau, grad)
        loss, dq = loss.cpu(), dq.cpu()
        want = oracle(q, q, keys, keys, groups, groups, 0, tau, grad)
        assert torch.isfinite(loss).all() and torch.isfinite(dq).all()
        assert np.abs(loss.double().numpy() - want[0][:, 0]).max() <= 1e-4 * np.abs(want[0]).max()
        assert rel(dq.double().numpy(), want[2] + want[3]) <= 1e-4


@needs_cpu_kernels
def test_cpu_extreme_temperature_is_finite(cpu_variant):
    check_extreme_temperatures("cpu", (0.05, 0.01))


@needs_cpu_kernels
def test_cpu_weights_ride_on_the_upstream_gradient():
    gen = torch.Generator().manual_seed(9)
    q, _, rk, ck, rg, cg, _ = make_problem("one_tower", 40, 32, 1, gen)
    q = q.float().requires_grad_(True)
    weights = torch.rand(40, generator=gen)
    loss, valid = per_row(q, q, rk[:, 0], ck[:, 0], rg, cg, 0, 0.1, backend="cpu")
    (weights * loss).sum().backward()
    want = oracle(q.detach().double(), q.detach().double(), rk, ck, rg, cg, 0, 0.1, weights.double()[:, None])
    assert rel(q.grad.double().numpy(), want[2] + want[3]) <= 1e-4


@needs_cpu_kernels
def test_cpu_is_deterministic():
    gen = torch.Generator().manual_seed(4)
    q, _, rk, ck, rg, cg, _ = make_problem("one_tower", 200, 64, 2, gen)
    q = q.float()
    grad = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    first = run_backend("cpu", q, None, rk, ck, rg, cg, 0, 0.1, grad)
    second = run_backend("cpu", q, None, rk, ck, rg, cg, 0, 0.1, grad)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])


@needs_cpu_kernels
def test_cpu_tasks_of_several_row_tiles(cpu_variant):
    # With one thread, 800 rows (17 row tiles) are cut into tasks of two row tiles; with eight,
    # into tasks of one. The arithmetic per row is the same either way, hence bitwise equality.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        check_against_oracle("cpu", "cross", 800, 16, 1, 0.1, seed=13)
        gen = torch.Generator().manual_seed(14)
        q, _, rk, ck, rg, cg, _ = make_problem("one_tower", 800, 32, 2, gen)
        grad = torch.randn(800, 2, generator=gen, dtype=torch.float64)
        one = run_backend("cpu", q.float(), None, rk, ck, rg, cg, 0, 0.1, grad)
        torch.set_num_threads(8)
        many = run_backend("cpu", q.float(), None, rk, ck, rg, cg, 0, 0.1, grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[2], many[2])


@needs_cpu_kernels
def test_two_key_sets_equal_two_single_passes():
    gen = torch.Generator().manual_seed(6)
    q, _, rk, ck, rg, cg, _ = make_problem("one_tower", 64, 32, 2, gen)
    q = q.float()
    both, valid = per_row(q, q, rk, ck, rg, cg, 0, 0.1, backend="cpu")
    for p in range(2):
        single, single_valid = per_row(q, q, rk[:, p], ck[:, p], rg, cg, 0, 0.1, backend="cpu")
        assert torch.allclose(both[:, p], single, atol=1e-6) and torch.equal(valid[:, p], single_valid)


@needs_cpu_kernels
def test_compiled_step_has_no_graph_break():
    from suncet.losses.contrastive import nt_xent_and_suncet

    gen = torch.Generator().manual_seed(8)
    z_u = torch.randn(32, 16, generator=gen, requires_grad=True)
    z_l = torch.randn(20, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 4, (20,), generator=gen)

    def step(z_u, z_l, labels):
        a, b = nt_xent_and_suncet(z_u, z_l, labels, backend="cpu")
        return a + b

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph raises on any break
    got = compiled(z_u, z_l, labels)
    got.backward()
    got_grads = (z_u.grad.clone(), z_l.grad.clone())
    z_u.grad = z_l.grad = None
    want = step(z_u, z_l, labels)
    want.backward()
    assert (
        torch.allclose(got, want) and torch.allclose(got_grads[0], z_u.grad) and torch.allclose(got_grads[1], z_l.grad)
    )


@needs_cpu_kernels
def test_fake_tensors_trace_through_the_ops():
    """Eager mode calls the backend directly; a dispatch mode (FakeTensorMode here, make_fx,
    torch.compile's tracing) must still reach the ops' fake implementations."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from suncet.losses.contrastive import nt_xent_and_suncet

    with FakeTensorMode():
        z_u = torch.randn(32, 16, requires_grad=True)
        z_l = torch.randn(20, 16, requires_grad=True)
        a, b = nt_xent_and_suncet(z_u, z_l, torch.randint(0, 4, (20,)), backend="cpu")
        (a + b).backward()
    assert isinstance(a, FakeTensor) and a.shape == () and z_u.grad.shape == (32, 16) and z_l.grad.shape == (20, 16)


# ---------------------------------------------------------------------------------------------
# triton backend in the interpreter (CPU-only machines).


@pytest.fixture
def triton_interpreter():
    skip_unless_triton_interpreter()
    kernels.backend_status.cache_clear()
    from suncet.kernels import triton_launch

    triton_launch.set_fp32_precision("ieee")
    yield triton_launch
    triton_launch.set_fp32_precision("tf32")


TRITON_CASES = [
    ("one_tower", 40, 3, 1, 0.1),
    ("one_tower", 37, 64, 2, 0.05),
    ("one_tower", 23, 130, 1, 0.5),
    ("two_block", 38, 128, 2, 0.1),
    ("cross", 13, 64, 1, 0.05),
    ("cross", 11, 128, 2, 0.5),
    # Below tau = log2(e) / 48 = 0.03006 the kernels take running maxima instead of the fixed bound.
    ("one_tower", 29, 64, 2, 0.02),
    ("cross", 12, 32, 1, 0.01),
    ("two_block", 30, 130, 2, 0.02),
]


@pytest.mark.parametrize("layout,rows,dim,sets,tau", TRITON_CASES)
def test_triton_interpreter_matches_float64_loops(triton_interpreter, layout, rows, dim, sets, tau):
    check_against_oracle("triton", layout, rows, dim, sets, tau, seed=rows * 5 + dim)


def test_triton_interpreter_extreme_temperature_is_finite(triton_interpreter):
    # 0.0301: just above the smallest tau with exponents relative to the fixed bound (antipodal
    # positives then sit 2 * 47.9 below it); 0.03 and 0.01: running maxima.
    check_extreme_temperatures("triton", (0.0301, 0.03, 0.01))


def test_triton_interpreter_special_rows(triton_interpreter):
    for tau in (0.1, 0.02):  # the fixed bound; running maxima
        check_special_rows("triton", tau)


@pytest.mark.parametrize("tau", [0.1, 0.02])  # the merged partial "maxima": the fixed bound; running maxima
def test_triton_interpreter_split_columns_merge_exactly(triton_interpreter, tau):
    gen = torch.Generator().manual_seed(12)
    q, k, rk, ck, rg, cg, offset = make_problem("cross", 12, 32, 2, gen)
    q, k = q.float(), k.float()
    layout = layout_of(q, k, rk, ck, rg, cg, offset)
    whole = triton_interpreter.forward(q, k, layout, tau, splits=1)
    for splits in (2, 3):
        parts = triton_interpreter.forward(q, k, layout, tau, splits=splits)
        for a, b in zip(whole, parts):
            assert torch.allclose(a.float(), b.float(), atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("layout,rows", [("one_tower", 40), ("two_block", 38), ("cross", 12)])
@pytest.mark.parametrize("tau", [0.1, 0.02])  # the fixed bound; running maxima
def test_triton_interpreter_backward_column_splits_add_in_order(triton_interpreter, layout, rows, tau):
    # Each split stores its partial gradient and the last to take a row tile's ticket adds them
    # in split order: any split count (5 leaves some splits without a column tile) must match
    # float64, repeat bitwise, and leave every ticket at 0 for the next launch.
    gen = torch.Generator().manual_seed(31)
    q, k, rk, ck, rg, cg, offset = make_problem(layout, rows, 32, 2, gen)
    one_tower = k is None
    q, k = q.float(), (q.float() if one_tower else k.float())
    grad = torch.randn(rows, 2, generator=gen, dtype=torch.float64)
    layout = layout_of(q, q if one_tower else k, rk, ck, rg, cg, offset)
    _, _, *stats = triton_interpreter.forward(q, k, layout, tau, splits=1)
    want = oracle(q.double(), k.double(), rk, ck, rg, cg, offset, tau, grad)
    want_dq = want[2] + want[3] if one_tower else want[2]

    def run(splits):
        dq, dk = triton_interpreter.backward(grad.float(), q, k, layout, tau, *stats, splits=splits)
        return dq, (torch.zeros(0) if dk is None else dk)

    for splits in (1, 2, 3, 5):
        dq, dk = run(splits)
        assert rel(dq.double().numpy(), want_dq) <= 1e-4
        if not one_tower:
            assert rel(dk.double().numpy(), want[3]) <= 1e-4
    first, again = run(3), run(3)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for plan in triton_interpreter._PLANS.values():
        assert not plan.backward_tickets.any()
    q[5, 3] = float("nan")  # the split that adds the partial sums keeps a non-finite row visible
    assert torch.isnan(run(3)[0][5]).all()


def _oracle_means(q, k, rk, ck, rg, cg, offset, tau, boundary, weights):
    """float64 masked means per (segment, set) and d(sum_s,p weights_sp mean_sp)/d(q, k)."""
    rows, sets = q.shape[0], rk.shape[1]
    loss, valid, _, _ = oracle(q, k, rk, ck, rg, cg, offset, tau, np.zeros((rows, sets)))
    seg = (np.arange(rows) >= boundary).astype(int)
    means, grad = np.zeros((2, sets)), np.zeros((rows, sets))
    for s in range(2):
        rows_s = seg == s
        counts = np.maximum(valid[rows_s].sum(0), 1)
        means[s] = (loss[rows_s] * valid[rows_s]).sum(0) / counts
        grad[rows_s] = valid[rows_s] * weights[s] / counts
    _, _, dq, dk = oracle(q, k, rk, ck, rg, cg, offset, tau, grad)
    return means, dq, dk


MEAN_CASES = [
    # layout, rows, dim, sets, tau, boundary (None: one segment)
    ("two_block", 38, 64, 1, 0.1, 19),
    ("one_tower", 37, 32, 2, 0.05, None),
    ("one_tower", 29, 64, 2, 0.02, 10),
    ("cross", 13, 64, 1, 0.1, None),
    ("cross", 12, 32, 2, 0.01, 5),
]


def check_means_against_oracle(backend, layout, rows, dim, sets, tau, boundary, seed=0, splits=None):
    gen = torch.Generator().manual_seed(seed)
    q, k, rk, ck, rg, cg, offset = make_problem(layout, rows, dim, sets, gen)
    weights = torch.randn(2, sets, generator=gen, dtype=torch.float64).numpy()
    qf = q.float().requires_grad_(True)
    kf = qf if k is None else k.float().requires_grad_(True)
    keys = (rk[:, 0], ck[:, 0]) if sets == 1 else (rk, ck)
    means = means_of(qf, kf, *keys, rg, cg, offset, tau, boundary=boundary, backend=backend)
    segments = 1 if boundary is None else 2
    assert len(means) == segments
    total = sum((torch.as_tensor(weights[s]).float() * means[s]).sum() for s in range(segments))
    inputs = (qf,) if k is None else (qf, kf)
    grads = torch.autograd.grad(total, inputs)
    want, want_dq, want_dk = _oracle_means(
        q.double(),
        q.double() if k is None else k.double(),
        rk,
        ck,
        rg,
        cg,
        offset,
        tau,
        rows if boundary is None else boundary,
        weights,
    )
    got = np.stack([np.atleast_1d(m.detach().double().numpy()) for m in means])
    assert np.abs(got - want[:segments]).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert rel(grads[0].double().numpy(), want_dq + want_dk if k is None else want_dq) <= 1e-4
    if k is not None:
        assert rel(grads[1].double().numpy(), want_dk) <= 1e-4


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernels), "reference"])
@pytest.mark.parametrize("layout,rows,dim,sets,tau,boundary", MEAN_CASES[:3])
def test_masked_means_match_float64(backend, layout, rows, dim, sets, tau, boundary):
    check_means_against_oracle(backend, layout, rows, dim, sets, tau, boundary)


@pytest.mark.parametrize("layout,rows,dim,sets,tau,boundary", MEAN_CASES)
def test_triton_interpreter_fused_means_match_float64(triton_interpreter, layout, rows, dim, sets, tau, boundary):
    check_means_against_oracle("triton", layout, rows, dim, sets, tau, boundary, seed=rows)


@pytest.mark.parametrize("tau", [0.1, 0.02])
def test_triton_interpreter_ids_beyond_fp32_take_the_exact_path(triton_interpreter, tau):
    # Fast tiles compare ids as fp32, exact up to 2^24: keys that differ only above that (same
    # low words, or equal after rounding to fp32) must still be told apart.
    gen = torch.Generator().manual_seed(23)
    q, _, rk, _, _, _, _ = make_problem("one_tower", 40, 16, 2, gen, classes=3)
    rows = torch.arange(40)
    rk = rk + torch.stack([(rows % 2) * 2**32, (rows % 3 == 0) * 1 + 2**24], 1)
    groups = torch.full((40,), 2**40, dtype=torch.long)
    grad = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    loss, valid, dq, _ = run_backend("triton", q.float(), None, rk, rk, groups, groups, 0, tau, grad)
    want = oracle(q, q, rk, rk, groups, groups, 0, tau, grad)
    np.testing.assert_array_equal(valid.numpy(), want[1])
    assert np.abs(loss.double().numpy() - want[0]).max() <= 1e-4 * max(1.0, np.abs(want[0]).max())
    assert rel(dq.double().numpy(), want[2] + want[3]) <= 1e-4


@pytest.mark.parametrize("layout,rows", [("one_tower", 40), ("cross", 32)])
def test_triton_interpreter_launcher_splits_columns_on_a_gpu_sized_grid(triton_interpreter, monkeypatch, layout, rows):
    # The launcher's own split count, as on a GPU: the grid function sees only the kernel's
    # arguments (the interpreter passes it the same), here with 16 multiprocessors and splits of
    # 16 columns, so that a few 16-row tiles split.
    from suncet.kernels import triton_tiles

    monkeypatch.setattr(triton_interpreter, "_PLANS", OrderedDict())
    monkeypatch.setattr(triton_interpreter, "_multiprocessors", lambda device: 16)
    monkeypatch.setattr(triton_tiles, "SPLIT_COLUMNS", 16)
    gen = torch.Generator().manual_seed(rows)
    q, k, rk, ck, rg, cg, offset = make_problem(layout, rows, 32, 2, gen)
    grad = torch.randn(rows, 2, generator=gen, dtype=torch.float64)
    k32 = None if k is None else k.float()
    loss, valid, dq, dk = run_backend("triton", q.float(), k32, rk, ck, rg, cg, offset, 0.1, grad)
    want = oracle(q.double(), q.double() if k is None else k.double(), rk, ck, rg, cg, offset, 0.1, grad)
    np.testing.assert_array_equal(valid.reshape(rows, 2).numpy(), want[1])
    assert np.abs(loss.reshape(rows, 2).double().numpy() - want[0]).max() <= 1e-4 * max(1.0, np.abs(want[0]).max())
    assert rel(dq.double().numpy(), want[2] + want[3] if k is None else want[2]) <= 1e-4
    if k is not None:
        assert rel(dk.double().numpy(), want[3]) <= 1e-4
    (plan,) = triton_interpreter._PLANS.values()
    assert plan.backward_grid({"BLOCK_M": 16})[1] > 1


@pytest.mark.parametrize("ids", ["across", "scattered", "chained"])
@pytest.mark.parametrize("towers", [1, 2])
def test_triton_interpreter_key_sets_skipped_only_where_they_cannot_meet(triton_interpreter, ids, towers):
    # NT-Xent's instance ids meet on few column tiles, and full tiles skip a key set whose
    # column keys lie outside the rows' range. "across": ids i mod 32 put each positive 32 rows
    # away, on the tile across; "scattered": ids (17 i mod 64) // 2 - 7 pair rows far apart,
    # negative ids among them, so that ranges overlap on tiles that hold no positive;
    # "chained": 16-row tiles (the interpreter's) hold ids 15 t ... 15 t + 15, so that the only
    # positives sit at the ends of adjacent tiles' ranges. Set 1 holds classes, which meet on
    # every tile. Two towers: rows 16 to 47 against all 64 as columns (a rank's rows against the
    # gathered ones), each side of the backward skipping on its own. Against float64, losses,
    # valid flags and gradients.
    rows = 64
    gen = torch.Generator().manual_seed(len(ids))
    row = torch.arange(rows)
    ids = {"across": row % 32, "scattered": (row * 17) % rows // 2 - 7, "chained": 15 * (row // 16) + row % 16}[ids]
    z = _unit(rows, 16, gen).float()
    keys = torch.stack([ids, torch.randint(0, 3, (rows,), generator=gen)], 1).contiguous()
    groups = torch.zeros(rows, dtype=torch.long)
    mine = slice(0, rows) if towers == 1 else slice(16, 48)
    q, rk, rg, offset = z[mine], keys[mine].contiguous(), groups[mine], mine.start
    grad = torch.randn(len(q), 2, generator=gen, dtype=torch.float64)
    loss, valid, dq, dk = run_backend("triton", q, None if towers == 1 else z, rk, keys, rg, groups, offset, 0.1, grad)
    want = oracle(q.double(), z.double(), rk, keys, rg, groups, offset, 0.1, grad)
    np.testing.assert_array_equal(valid.numpy(), want[1])
    assert np.abs(loss.double().numpy() - want[0]).max() <= 1e-4 * max(1.0, np.abs(want[0]).max())
    assert rel(dq.double().numpy(), want[2] + want[3] if towers == 1 else want[2]) <= 1e-4
    if towers == 2:
        assert rel(dk.double().numpy(), want[3]) <= 1e-4


@pytest.mark.parametrize("tau", [0.1, 0.02])
def test_triton_interpreter_fused_means_merge_splits_and_repeat_exactly(triton_interpreter, tau):
    # The finishing kernel merges column splits and reduces the blocks' sums after an int32
    # ticket; the ticket is reset for the next call, so a second call must agree bitwise.
    gen = torch.Generator().manual_seed(21)
    q, _, rk, ck, rg, cg, _ = make_problem("two_block", 40, 32, 2, gen)
    q = q.float()

    layout = layout_of(q, q, rk, ck, rg, cg, 0, boundary=20)

    def run(splits):  # the means of both segments; the statistics the backward reads, and the counts
        means, stats = triton_interpreter.forward_mean(q, q, layout, tau, splits=splits)
        return torch.stack(means), stats

    first, again, whole = run(3), run(3), run(1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert torch.allclose(first[0], whole[0], atol=1e-5) and torch.allclose(first[1], whole[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Non-finite inputs: no kernel, mask or mean may turn them into a finite loss.


def _non_finite_cases():
    gen = torch.Generator().manual_seed(17)
    cases = []
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
        q, _, rk, ck, rg, cg, _ = make_problem("two_block", 24, 16, 1, gen)
        q = q.float()
        q[3, 5] = value  # a valid row
        cases.append((f"{name}, valid row", q, None, rk[:, 0], rg))
        q2, _, rk2, _, rg2, _, _ = make_problem("one_tower", 20, 16, 1, gen)
        q2 = q2.float()
        rk2 = rk2[:, 0].clone()
        rg2 = rg2.clone()
        rg2[7] = 9  # alone in its group: sees no column, invalid
        q2[7, 2] = value
        cases.append((f"{name}, isolated invalid row", q2, None, rk2, rg2))
    q, k, rk, ck, rg, cg, offset = make_problem("cross", 8, 16, 1, gen)
    k = k.float()
    k[2, 4] = float("nan")  # another rank's column
    cases.append(("nan in a column of k", q.float(), (k, ck[:, 0], cg, offset), rk[:, 0], rg))
    return cases


def check_non_finite(backend):
    for label, q, cross, keys, groups in _non_finite_cases():
        q = q.clone().requires_grad_(True)
        if cross is None:
            k, ck, cg, offset = q, keys, groups, 0
        else:
            k, ck, cg, offset = cross[0].clone().requires_grad_(True), cross[1], cross[2], cross[3]
        inputs = (q,) if cross is None else (q, k)
        loss, valid = per_row(q, k, keys, ck, groups, cg, offset, 0.1, backend=backend)
        mean = (loss * valid).sum() / valid.sum().clamp(min=1)  # losses.masked_mean's arithmetic
        assert not torch.isfinite(mean), f"{backend}, {label}: per-row loss, finite mean {mean}"
        grads = torch.autograd.grad(loss.sum(), inputs)
        assert not all(torch.isfinite(g).all() for g in grads), f"{backend}, {label}: finite gradient"
        (fused,) = means_of(q, k, keys, ck, groups, cg, offset, 0.1, backend=backend)
        assert not torch.isfinite(fused), f"{backend}, {label}: finite fused mean {fused}"
        grads = torch.autograd.grad(fused, inputs)
        assert not all(torch.isfinite(g).all() for g in grads), f"{backend}, {label}: finite gradient of the mean"


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernels), "reference"])
def test_non_finite_inputs_give_non_finite_loss_and_gradient(backend):
    check_non_finite(backend)


@needs_cpu_kernels
def test_every_cpu_variant_keeps_non_finite(cpu_variant):
    check_non_finite("cpu")


def test_triton_interpreter_non_finite_inputs(triton_interpreter):
    check_non_finite("triton")


def test_triton_interpreter_losses_keep_non_finite(triton_interpreter):
    check_losses_keep_non_finite("triton")


def test_triton_interpreter_losses_nan_every_row_that_sees_a_non_finite_row(triton_interpreter):
    check_rows_that_see_a_non_finite_row_are_nan("triton")


def test_triton_backward_mode_follows_tau_and_width():
    pytest.importorskip("triton")
    from suncet.kernels import triton_kernels, triton_tiles

    assert triton_tiles.bounded_backward(0.1, 128) and triton_tiles.bounded_backward(0.0301, 64)
    assert not triton_tiles.bounded_backward(0.02, 128)  # the bound would leave fp32's normal range
    assert not triton_tiles.bounded_backward(0.1, 256)  # every bounded tile spills at D = 256
    if triton_tiles.INTERPRETING:
        return
    configs = triton_kernels.backward_kernel.configs
    tiles = {triton_tiles.tile_of(c) for c in triton_tiles.prune_backward(configs, {"D": 128}, BOUNDED=True)}
    table = triton_tiles.BOUNDED_BACKWARD_TABLE[128]
    assert tiles == (set(table) if triton_tiles.AUTOTUNE else {table[0]})


def test_triton_interpreter_in_subprocess():
    rerun_under_triton_interpreter(
        __file__,
        "interpreter_matches or interpreter_split or interpreter_extreme or interpreter_special"
        " or interpreter_fused or interpreter_non_finite or interpreter_ids or interpreter_losses"
        " or interpreter_backward or interpreter_launcher or interpreter_key",
        passed=len(TRITON_CASES) + 4 + len(MEAN_CASES) + 2 + 1 + 3 + 1 + 6 + 2 + 6,
    )


# ---------------------------------------------------------------------------------------------
# Backend choice.


def test_resolve_backend_explains_what_cannot_run():
    with pytest.raises(ConfigError, match="unknown kernel backend"):
        kernels.resolve_backend("fast", "cpu")
    assert kernels.resolve_backend("reference", "cpu") == "reference"
    assert kernels.resolve_backend("auto", "cpu") == ("cpu" if CPU_STATUS[0] else "reference")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            kernels.resolve_backend("cuda", "cpu")
    if CPU_STATUS[0]:
        with pytest.raises(ConfigError, match="CPU tensors"):
            kernels.resolve_backend("cpu", "cuda")


def test_backend_records_state_what_each_backend_takes():
    from suncet.kernels.backends import BY_NAME, RECORDS

    assert kernels.BACKENDS == tuple(record.name for record in RECORDS)
    assert set(kernels.backend_status()) == set(kernels.BACKENDS)
    cuda = torch.device("cuda")
    assert "does not take torch.float32" in BY_NAME["cuda"].refuses(cuda, torch.float32, 128)
    assert "D <= 256" in BY_NAME["triton"].refuses(cuda, torch.bfloat16, 512)
    assert BY_NAME["triton"].refuses(cuda, torch.bfloat16, 256) == ""
    assert "CUDA tensors" in BY_NAME["cuda"].refuses(torch.device("cpu"), torch.bfloat16, 128)
    assert BY_NAME["reference"].refuses(torch.device("meta"), torch.float64, 10**6) == ""
    # auto never picks a fused backend that refuses the inputs, whatever runs on this machine
    assert kernels.resolve_backend("auto", "cpu", torch.int32) == "reference"
    # Each fused backend's module implements the protocol its record states.
    for record in RECORDS:
        if record.module is None or not kernels.backend_status()[record.name][0]:
            continue
        module = record.kernels
        assert callable(module.forward) and callable(module.backward)
        assert record.fuses_means == hasattr(module, "forward_mean") == hasattr(module, "backward_mean")


@needs_cpu_kernels
def test_losses_module_runs_on_the_cpu_backend():
    from suncet.losses.contrastive import nt_xent, suncet_loss

    gen = torch.Generator().manual_seed(10)
    z = torch.randn(48, 24, generator=gen)
    labels = torch.randint(0, 6, (48,), generator=gen)
    for fn in (lambda b: nt_xent(z, backend=b), lambda b: suncet_loss(z, labels, backend=b)):
        assert torch.allclose(fn("cpu"), fn("reference"), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_check.sh).

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_problem(rows, dim, sets, seed, layout="one_tower"):
    gen = torch.Generator().manual_seed(seed)
    return make_problem(layout, rows, dim, sets, gen, classes=max(4, rows // 40))


def _check_gpu(backend, layout, rows, dim, sets, dtype, tol, seed=1, tau=0.1):
    q, k, rk, ck, rg, cg, offset = _gpu_problem(rows, dim, sets, seed, layout)
    grad = torch.randn(rows, sets, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dev = torch.device("cuda")
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    qd, kd = q.to(dev, dtype), (None if k is None else k.to(dev, dtype))
    loss, valid, dq, dk = run_backend(backend, qd, kd, to(rk), to(ck), to(rg), to(cg), offset, tau, grad.to(dev))
    # The float64 oracle of the same (rounded) inputs, through the cpu backend's fp64 path for speed.
    q64, k64 = qd.double().cpu(), (None if kd is None else kd.double().cpu())
    want = run_backend("cpu", q64, k64, rk, ck, rg, cg, offset, tau, grad)
    assert torch.isfinite(loss).all() and torch.isfinite(dq).all()
    assert torch.equal(valid.cpu(), want[1])
    assert rel(loss.double().cpu(), want[0]) <= tol
    assert rel(dq.double().cpu(), want[2]) <= tol
    if k is not None:
        assert rel(dk.double().cpu(), want[3]) <= tol


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["one_tower", "two_block", "cross"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 3e-3)])
@pytest.mark.parametrize("tau", [0.1, 0.02])  # exponents relative to the fixed bound; running maxima
def test_gpu_triton_matches_float64(layout, dtype, tol, tau):
    _check_gpu("triton", layout, 1000, 128, 2, dtype, tol, tau=tau)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 3e-3)])
@pytest.mark.parametrize("tau", [0.1, 0.02])
def test_gpu_triton_fused_means_match_float64(dtype, tol, tau):
    # The masked means reduced in the kernels (two segments, two key sets) against the cpu
    # backend's float64 path on the same rounded inputs.
    q, _, rk, ck, rg, cg, _ = _gpu_problem(1000, 128, 2, seed=3, layout="two_block")
    weights = torch.tensor([[0.7, -1.3], [0.4, 2.0]], dtype=torch.float64)

    def means_and_grad(z, backend):
        z = z.detach().clone().requires_grad_(True)
        keys, groups = rk.to(z.device), rg.to(z.device)
        means = means_of(z, z, keys, keys, groups, groups, 0, tau, boundary=500, backend=backend)
        total = sum((weights[s].to(z.device, means[s].dtype) * means[s]).sum() for s in range(2))
        (grad,) = torch.autograd.grad(total, z)
        return torch.stack([m.detach().double().cpu() for m in means]), grad.double().cpu()

    zd = q.to("cuda", dtype)
    got, got_grad = means_and_grad(zd, "triton")
    want, want_grad = means_and_grad(zd.double().cpu(), "cpu")
    assert rel(got, want) <= tol and rel(got_grad, want_grad) <= tol
    again, again_grad = means_and_grad(zd, "triton")
    assert torch.equal(got, again) and torch.equal(got_grad, again_grad)  # fixed-order reductions


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["one_tower", "cross"])
def test_gpu_triton_backward_column_splits_match_float64_and_repeat(layout):
    # The launcher's own split count (None: 2 to 4 at 2,048 rows on an H100/H200) and forced ones.
    from suncet.kernels import triton_launch

    q, k, rk, ck, rg, cg, offset = _gpu_problem(2048, 128, 2, 5, layout)
    grad = torch.randn(2048, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    one_tower = k is None
    qd = q.to("cuda", torch.bfloat16)
    kd = qd if one_tower else k.to("cuda", torch.bfloat16)
    layout = layout_of(qd, kd, *[t.cuda() for t in (rk, ck, rg, cg)], offset)
    _, _, *stats = triton_launch.forward(qd, kd, layout, 0.1)
    k64 = None if one_tower else kd.double().cpu()
    want = run_backend("cpu", qd.double().cpu(), k64, rk, ck, rg, cg, offset, 0.1, grad)
    for splits in (None, 3, 8):

        def run():
            return triton_launch.backward(grad.cuda().float(), qd, kd, layout, 0.1, *stats, splits=splits)

        dq, dk = run()
        assert rel(dq.double().cpu(), want[2]) <= 1e-2
        if not one_tower:
            assert rel(dk.double().cpu(), want[3]) <= 1e-2
        again = run()
        assert torch.equal(dq, again[0]) and (one_tower or torch.equal(dk, again[1]))


@gpu
@needs_cuda
def test_gpu_non_finite_inputs():
    for backend in ("triton", "cuda"):
        if not kernels.backend_status()[backend][0]:
            continue
        for label, q, cross, keys, groups in _non_finite_cases():
            to = lambda t: t.to("cuda", torch.bfloat16 if backend == "cuda" else torch.float32)  # noqa: E731
            z = to(q).requires_grad_(True)
            k = z if cross is None else to(cross[0]).requires_grad_(True)
            ck, cg, offset = (keys, groups, 0) if cross is None else cross[1:]
            args = (keys.cuda(), ck.cuda(), groups.cuda(), cg.cuda(), offset, 0.1)
            (mean,) = means_of(z, k, *args, backend=backend)
            assert not torch.isfinite(mean), (backend, label)
            grads = torch.autograd.grad(mean, (z,) if cross is None else (z, k))
            assert not all(torch.isfinite(g).all() for g in grads), (backend, label)


@gpu
@needs_cuda
def test_gpu_triton_extreme_temperatures_and_special_rows():
    kernels.set_fp32_precision("ieee")
    try:
        check_extreme_temperatures("triton", (0.0301, 0.03, 0.01), device="cuda")
        for tau in (0.1, 0.02):
            check_special_rows("triton", tau, device="cuda")
    finally:
        kernels.set_fp32_precision("tf32")


@gpu
@needs_cuda
def test_gpu_triton_ieee_fp32_matches_float64():
    kernels.set_fp32_precision("ieee")
    try:
        _check_gpu("triton", "one_tower", 777, 130, 1, torch.float32, 1e-4)
    finally:
        kernels.set_fp32_precision("tf32")


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["one_tower", "cross"])
def test_gpu_cuda_backend_matches_float64(layout):
    if not kernels.backend_status()["cuda"][0]:
        pytest.skip(kernels.backend_status()["cuda"][1])
    _check_gpu("cuda", layout, 1000, 128, 2, torch.bfloat16, 1e-2)
    _check_gpu("cuda", layout, 300, 70, 1, torch.bfloat16, 1e-2, tau=0.05)  # D % 8 != 0: unvectorised loads


@gpu
@needs_cuda
def test_gpu_large_n_is_finite_deterministic_and_small():
    rows, dim = 32768, 128
    z = F.normalize(torch.randn(rows, dim, device="cuda"), dim=1).to(torch.bfloat16)
    keys = torch.stack(
        [torch.arange(rows, device="cuda") % (rows // 2), torch.randint(0, 100, (rows,), device="cuda")], 1
    )
    groups = torch.zeros(rows, dtype=torch.long, device="cuda")

    def step():
        zz = z.detach().requires_grad_(True)
        loss, valid = per_row(zz, zz, keys, keys, groups, groups, 0, 0.05, backend="triton")
        loss.sum().backward()
        return loss, zz.grad

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    first = step()
    extra = torch.cuda.max_memory_allocated() - base
    second = step()
    assert torch.isfinite(first[0]).all() and torch.isfinite(first[1]).all()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # O(N D): the bf16 gradient (8 MiB here) plus O(N) statistics, never an N x N matrix (2 GiB).
    assert extra < 32 * 2**20


# ---------------------------------------------------------------------------------------------
# Safe across streams, graph capture and large shapes (reliability round three).


_ONE_TOWER = Layout.of(torch.zeros(4, dtype=torch.long), one_tower=True)
_TWO_TOWERS = Layout.of(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long))
_MISFITS = [
    (torch.randn(4), None, _ONE_TOWER, r"^q and k must be \[rows, D\] with the same D, got \(4,\)$"),
    (torch.randn(4, 8), torch.randn(5, 3), _TWO_TOWERS, r"same D, got \(4, 8\) and \(5, 3\)$"),
    (torch.randn(4, 8), torch.randn(5, 8).double(), _TWO_TOWERS, "^q and k must share a dtype"),
    (torch.randn(5, 8), None, _ONE_TOWER, r"^the layout \(4 rows, 4 columns, one_tower=True\) does not fit q \(5, 8\)"),
    (torch.randn(4, 8), None, _TWO_TOWERS, r"one_tower=False\) does not fit q \(4, 8\) and k = q$"),
    (torch.randn(4, 8), torch.randn(4, 8), _ONE_TOWER, r"one_tower=True\) does not fit q \(4, 8\) and k \(4, 8\)$"),
]


@pytest.mark.parametrize("q,k,layout,message", _MISFITS)
@pytest.mark.parametrize("op", [kernels.multi_positive, kernels.multi_positive_mean])
def test_operands_that_do_not_fit_the_layout_are_refused_in_one_line(op, q, k, layout, message):
    with pytest.raises(ValueError, match=message) as info:
        op(q, k, layout, 0.1, backend="reference")
    assert "\n" not in str(info.value)


def test_triton_plans_are_bounded_and_offsets_past_int32_are_refused():
    pytest.importorskip("triton")
    from suncet.kernels import triton_launch

    triton_launch._PLANS.clear()
    for rows in range(8, 8 + 2 * triton_launch.MAX_PLANS):
        triton_launch._plan(
            torch.zeros(rows, 16),
            kernels.Layout.of(torch.zeros(rows, dtype=torch.long), one_tower=True),
            0.1,
            None,
        )
    assert len(triton_launch._PLANS) == triton_launch.MAX_PLANS
    newest = next(reversed(triton_launch._PLANS))
    assert newest[0] == 7 + 2 * triton_launch.MAX_PLANS  # the most recent plans are the ones kept
    triton_launch.check_int32_offsets(2**24 - 1, 2**24 - 1, 128, 2, 1)  # just inside: 2^31 - 128
    for m, n, d, p, splits in ((2**24, 8, 128, 1, 1), (8, 2**24, 128, 1, 1), (2**25, 8, 64, 2, 8)):
        with pytest.raises(ValueError, match="exceed the triton kernels' int32 offsets"):
            triton_launch.check_int32_offsets(m, n, d, p, splits)


def _fresh_problem(seed):
    q, k, rk, ck, rg, cg, offset = _gpu_problem(700, 128, 2, seed, "cross")
    return [t.to("cuda") if t is not None else None for t in (q.bfloat16(), k.bfloat16(), rk, ck, rg, cg)] + [offset]


@gpu
@needs_cuda
def test_gpu_triton_launches_on_two_streams_at_once_keep_their_own_scratch():
    """Two overlapping launches of one shape on two streams: each gradient equals the same
    launch alone (shared tickets or partial sums would leave rows unwritten or mixed)."""
    problems = [_fresh_problem(seed) for seed in (11, 12)]
    grad = torch.randn(700, 2, device="cuda")
    alone = [run_backend("triton", *p[:6], p[6], 0.1, grad) for p in problems]
    streams = [torch.cuda.Stream() for _ in problems]
    torch.cuda.synchronize()
    together = [None, None]
    for repeat in range(20):
        for i, (problem, stream) in enumerate(zip(problems, streams)):
            with torch.cuda.stream(stream):
                together[i] = run_backend("triton", *problem[:6], problem[6], 0.1, grad)
        torch.cuda.synchronize()
        for got, want in zip(together, alone):
            for g, w in zip(got, want):
                assert torch.equal(g, w), f"repeat {repeat}"


@gpu
@needs_cuda
def test_gpu_triton_plan_made_during_graph_capture_leaves_eager_launches_correct():
    from suncet.kernels import triton_launch

    triton_launch._PLANS.clear()
    problem = _fresh_problem(13)
    grad = torch.randn(700, 2, device="cuda")
    side = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        run_backend("triton", *problem[:6], problem[6], 0.1, grad)  # warm-up: compile, autotune
        torch.cuda.synchronize()
        triton_launch._PLANS.clear()
        with torch.cuda.graph(graph):
            captured = run_backend("triton", *problem[:6], problem[6], 0.1, grad)
    graph.replay()
    eager = run_backend("triton", *problem[:6], problem[6], 0.1, grad)
    torch.cuda.synchronize()
    for g, e in zip(captured, eager):
        assert torch.equal(g, e)
    want = run_backend(
        "cpu",
        *[
            t.cpu().double() if t is not None and t.is_floating_point() else (t.cpu() if t is not None else None)
            for t in problem[:6]
        ],
        problem[6],
        0.1,
        grad.cpu().double(),
    )
    assert rel(eager[2].double().cpu(), want[2]) <= 1e-2


@gpu
@needs_cuda
def test_gpu_large_offsets_are_refused_before_any_launch():
    q = torch.empty((2**24, 128), device="meta")
    with pytest.raises(ValueError, match="int32 offsets"):
        from suncet.kernels import triton_launch

        triton_launch.check_int32_offsets(q.shape[0], q.shape[0], q.shape[1], 1, 1)
    big = torch.zeros((2**24 + 8, 128), device="cuda", dtype=torch.bfloat16)  # 4 GiB of bf16 rows
    keys = torch.zeros(big.shape[0], dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="int32 offsets"):
        per_row(big, big, keys, keys, keys, keys, 0, 0.1, "triton")


@gpu
@needs_cuda
def test_gpu_cuda_backend_takes_an_empty_column_set_and_unaligned_rows():
    if not kernels.backend_status()["cuda"][0]:
        pytest.skip(kernels.backend_status()["cuda"][1])
    q = torch.nn.functional.normalize(torch.randn(40, 64, device="cuda"), dim=1).bfloat16().requires_grad_(True)
    empty = torch.empty((0, 64), device="cuda", dtype=torch.bfloat16, requires_grad=True)
    keys = torch.zeros(40, dtype=torch.long, device="cuda")
    none = torch.zeros(0, dtype=torch.long, device="cuda")
    loss, valid = per_row(q, empty, keys, none, keys, none, 40, 0.1, "cuda")
    assert not valid.any() and torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q.grad))
    # A contiguous view starting 4 elements (8 bytes) into its storage: no 16-byte vector loads.
    storage = torch.nn.functional.normalize(torch.randn(41 * 64, device="cuda"), dim=0).bfloat16()
    shifted = storage[4 : 4 + 40 * 64].view(40, 64)
    assert shifted.data_ptr() % 16 != 0
    keys = torch.arange(40, device="cuda") % 5
    got = per_row(shifted, shifted, keys, keys, keys * 0, keys * 0, 0, 0.1, "cuda")[0]
    want = per_row(shifted.clone(), shifted.clone(), keys, keys, keys * 0, keys * 0, 0, 0.1, "cuda")[0]
    assert torch.equal(got, want)
