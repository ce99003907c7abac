"""The triton backend's module (suncet/kernels/backends.py, ``Kernels``): the launchers of the
Triton loss kernels, ``forward``, ``backward``, ``forward_mean`` and ``backward_mean``.

Each entry point takes the launch plan of its shapes, dtype, device, tau and layout (``_Plan``:
grids, compile-time constants, column splits and scratch buffers, made once per such
combination, so that a step spends its host time on launches) and launches the kernels of
triton_kernels.py on it, on the device that holds the operands. The choices a plan is made of
(exponent mode, tiles, splits) are those of triton_tiles.py. How fp32 inputs use the tensor
cores (``set_fp32_precision``) is set here and is part of each plan's key.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton

from suncet.kernels import triton_kernels as kernels
from suncet.kernels import triton_tiles as tiles

# `# fmt: skip` keeps the launches' argument lists as tables, a group of the kernel's arguments a line.

_fp32_precision = os.environ.get("SUNCET_TRITON_FP32_PRECISION", "tf32")


def set_fp32_precision(mode: str) -> None:
    """How fp32 inputs use the tensor cores: ``"tf32"`` (default) or ``"ieee"`` (exact fp32)."""
    global _fp32_precision
    if mode not in ("tf32", "ieee"):
        raise ValueError(f"fp32 precision must be 'tf32' or 'ieee', got {mode!r}")
    _fp32_precision = mode


def fp32_precision() -> str:
    return _fp32_precision


def last_configs() -> list[str]:
    """The tile (BLOCK_M, BLOCK_N, warps, stages) each kernel ran with last, for benchmark notes."""
    notes = []
    for name, kernel in (("forward", kernels.forward_kernel), ("backward", kernels.backward_kernel)):
        config = getattr(kernel, "best_config", None)
        if config is not None:
            notes.append(f"{name} tile {tiles.tile_of(config)}")
    return notes


def _precision(dtype: torch.dtype) -> str:
    return _fp32_precision if dtype == torch.float32 else "tf32"


def _multiprocessors(device: torch.device) -> int:
    """The device's multiprocessors, 0 where it is not a GPU."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def statistics(rows: int, sets: int, d: int, tau: float, dtype: torch.dtype, means: bool) -> list[tuple]:
    """(shape, dtype) of each statistics tensor ``forward`` (``means`` False) or
    ``forward_mean`` returns: one fp32 buffer, per row the denominator's statistic and ``sets``
    more, or for the means ``_Plan.mean_stats`` more and then the valid counts [2, P]."""
    if not means:
        return [((rows * (1 + sets),), torch.float32)]
    per_row = 2 * sets if tiles.bounded_backward(tau, d) else sets
    return [((rows * (1 + per_row) + 2 * sets,), torch.float32)]


class _Plan:
    """What a launch needs that depends only on shapes, dtype, device, tau and layout, made once
    per such combination: grids, compile-time constants, and scratch buffers that live only
    within one kernel or between the forward kernel and the finishing one of the same call
    (stream order keeps one call's use of them before the next call's; calls on another stream
    get plans of their own, and a graph capture plans afresh: ``_plan``). A step then spends its
    host time on launches. ``splits`` overrides the column splits of both directions;
    ``capture``: the plan is a graph capture's, whose launches never autotune (``_Launch``)."""

    def __init__(self, m, n, d, p, dtype, device, tau, one_tower, splits, capture):
        self.capture = capture
        f32 = dict(device=device, dtype=torch.float32)
        sms = _multiprocessors(device)
        self.splits = splits or tiles.forward_splits(m, n, sms)
        check_int32_offsets(m, n, d, p, self.splits)
        self.bounded_backward = tiles.bounded_backward(tau, d)
        self.scale2, self.inv_tau = tiles.LOG2E / tau, 1.0 / tau
        self.buckets = (triton.next_power_of_2(m), triton.next_power_of_2(n))
        self.tuning_key = (*self.buckets, d, dtype)  # what the autotuner's choice depends on, beside the constants
        self.first_configs = (tiles.first_forward_config(d), tiles.first_backward_config(d, self.bounded_backward))
        common = dict(P=p, BLOCK_D=tiles.block_d(d), EVEN_D=tiles.block_d(d) == d, PRECISION=_precision(dtype))
        self.forward_constants = dict(
            **common, BOUNDED=tiles.bounded(tau), INVERSE=self.bounded_backward, CHECK_K=not one_tower
        )
        self.backward_constants = dict(**common, BOUNDED=self.bounded_backward)
        # Statistics per row of the masked-means path: in the bounded backward, each set's
        # share of the denominator's inverse as well (no validity test per column).
        self.mean_stats = 2 * p if self.bounded_backward else p
        self.mean_stats_size = m * (1 + self.mean_stats) + 2 * p
        # Each kernel's launch (grid, constants, recorded tile) made once: the forward kernel's
        # of the per-row and of the means path, the finishing kernel's; the backward's per variant.
        forward_grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), self.splits)  # noqa: E731
        self.forward_rows, self.forward_means = (
            _Launch(kernels.forward_kernel, forward_grid, dict(STATS=per_row, **self.forward_constants),
                    (self.tuning_key, per_row), self.first_configs[0], capture)
            for per_row in (p, self.mean_stats)
        )  # fmt: skip
        self.backward_launches: dict[tuple, _Launch] = {}
        finish = dict(P=p, INVERSE=self.bounded_backward, BLOCK=tiles.FINISH_BLOCK)
        self.finish_rows = dict(STATS=p, MERGE=True, MEANS=False, **finish)
        self.finish_means = dict(STATS=self.mean_stats, MERGE=self.splits > 1, MEANS=True, **finish)
        finish_blocks = triton.cdiv(m, tiles.FINISH_BLOCK)
        self.finish = kernels.finish_kernel[(finish_blocks,)]
        # The backward: q's row tiles, then (two towers) k's, by column splits; the partial sums
        # are sized for the candidate tile that splits most.
        backward_rows = m if one_tower else m + n

        def split_count(block_m):
            return splits or tiles.backward_splits(backward_rows, min(m, n), sms, block_m)

        self.backward_grid = lambda meta: (
            triton.cdiv(m, meta["BLOCK_M"]) + (0 if one_tower else triton.cdiv(n, meta["BLOCK_M"])),
            split_count(meta["BLOCK_M"]),
        )
        candidates = [tiles.INTERPRETER_TILE] if tiles.INTERPRETING else tiles.backward_tiles(d, self.bounded_backward)
        most = max(split_count(tile[0]) for tile in candidates)
        if most * backward_rows * tiles.block_d(d) >= 2**31:  # the kernel's int32 offsets into the partial sums
            raise ValueError(f"{most} column splits of {backward_rows} rows exceed the backward's int32 offsets")
        self.backward_partial = torch.empty(most * backward_rows * tiles.block_d(d) if most > 1 else 1, **f32)
        self.backward_tickets = torch.zeros(backward_rows, device=device, dtype=torch.int32)
        self.partial = torch.empty((self.splits, 2 + 2 * p, m), **f32) if self.splits > 1 else torch.empty(1, **f32)
        self.loss = torch.empty((m, p), **f32)
        self.valid = torch.empty((m, p), device=device, dtype=torch.bool)
        self.block_sums = torch.empty((finish_blocks, 4 * p), **f32)
        self.ticket = torch.zeros(1, device=device, dtype=torch.int32)
        self.mean_like = torch.empty(() if p == 1 else (p,), **f32)  # each mean's shape, for empty_like
        self.unused_mean = torch.empty(p, **f32)  # where the second segment's mean goes when there is none
        buffers = (self.backward_partial, self.backward_tickets, self.partial, self.loss, self.valid, self.block_sums)
        self.nbytes = sum(t.numel() * t.element_size() for t in buffers)


def check_int32_offsets(m: int, n: int, d: int, p: int, splits: int) -> None:
    """The kernels index rows (``row * D``) and the forward's partial statistics in int32:
    refuse shapes whose offsets would pass 2^31 rather than read or write the wrong memory."""
    largest = max(max(m, n) * tiles.block_d(d), splits * (2 + 2 * p) * m)
    if largest >= 2**31:
        raise ValueError(
            f"{m} x {n} rows of width {d} exceed the triton kernels' int32 offsets (2^31); "
            "split the batch, or use the cpu or reference backend"
        )


# Plans hold scratch buffers and split tickets that a launch uses from start to end: two
# overlapping launches must not share them, so the key holds the CUDA stream. A plan made while
# a CUDA graph is captured is that capture's alone (its tickets are zeroed only inside that
# graph, its buffers live in that graph's pool) and is not kept. The cache keeps the most recent
# plans, at most MAX_PLANS of them and MAX_PLAN_BYTES of scratch together.
_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
MAX_PLANS = 32
MAX_PLAN_BYTES = 1 << 30


def capturing(q: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``q``'s device."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _plan(q: torch.Tensor, layout, tau: float, splits: int | None) -> _Plan:
    """The plan of a call on ``q``'s device (the current one) and its current stream: a plan of
    its own while a graph is being captured there."""
    m, d = q.shape
    n, p, one_tower = layout.cols, layout.sets, layout.one_tower
    if capturing(q):
        return _Plan(m, n, d, p, q.dtype, q.device, tau, one_tower, splits, True)
    where = (q.get_device(), torch.cuda.current_stream().cuda_stream) if q.is_cuda else None
    key = (m, n, d, p, q.dtype, where, tau, one_tower, splits, _fp32_precision)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(m, n, d, p, q.dtype, q.device, tau, one_tower, splits, False)
        while len(_PLANS) > 1 and (
            len(_PLANS) > MAX_PLANS or sum(kept.nbytes for kept in _PLANS.values()) > MAX_PLAN_BYTES
        ):
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def _elsewhere(q: torch.Tensor) -> bool:
    """Whether ``q`` is on a CUDA device other than the current one. Triton launches on the
    current device, so each entry point then calls itself again under ``torch.cuda.device``."""
    return q.is_cuda and q.get_device() != torch.cuda.current_device()


# The tile the autotuner chose per kernel and key (row buckets and constants): a launch while a
# graph is captured must not benchmark (the timing synchronises), so it takes the choice made
# eagerly for its bucket, or the first tile of the table.
_CHOSEN: dict[tuple, triton.Config] = {}


class _Launch:
    """One autotuned kernel as a plan launches it, its grid bound and constants merged once.
    Eagerly the autotuner runs and its choice is recorded under ``chosen_key``; in a capture's
    plan the kernel launches past the autotuner, with the tile recorded for that key, else
    ``default``."""

    __slots__ = ("kernel", "launch", "constants", "record_as")

    def __init__(self, kernel, grid, constants: dict, chosen_key: tuple, default: triton.Config, capture: bool):
        self.kernel, chosen_key = kernel, (kernel, *chosen_key)
        if capture:
            self.launch, self.record_as = kernel.fn[grid], None
            self.constants = {**constants, **_CHOSEN.get(chosen_key, default).all_kwargs()}
        else:
            self.launch, self.constants, self.record_as = kernel[grid], constants, chosen_key

    def run(self, *args) -> None:
        self.launch(*args, **self.constants)
        if self.record_as is not None and self.record_as not in _CHOSEN:
            _CHOSEN[self.record_as] = self.kernel.best_config


def _backward_launch(plan: _Plan, layout, mean: int) -> _Launch:
    """The backward kernel's launch with ``mean`` segments (0: per-row upstream gradients)."""
    per_row = plan.mean_stats if mean else layout.sets
    constants = dict(
        MEAN=mean, SYMMETRIC=layout.symmetric, STATS=per_row, TWO_SIDES=not layout.one_tower,
        **plan.backward_constants,
    )  # fmt: skip
    variant = (mean, layout.symmetric)
    launch = plan.backward_launches[variant] = _Launch(
        kernels.backward_kernel, plan.backward_grid, constants, (plan.tuning_key, *variant, per_row),
        plan.first_configs[1], plan.capture,
    )  # fmt: skip
    return launch


def _operands(q, k, layout):
    """q and k contiguous; k is q itself with one tower."""
    q = q.contiguous()
    return q, (q if layout.one_tower else k.contiguous())


def _run_forward(launch, plan, q, k, layout, loss, valid, stats) -> None:
    """The forward kernel's ``launch``, writing the rows' statistics to ``stats``: one a row, then
    those of the launch's path (``STATS``) a row."""
    m, d = q.shape
    launch.run(
        q, k, layout.row_keys, layout.col_keys, layout.row_groups, layout.col_groups,
        plan.partial, loss, valid, stats, m, k.shape[0], d, layout.self_offset, plan.scale2, *plan.buckets,
    )  # fmt: skip


def forward(q, k, layout, tau, *, splits=None):
    """(loss [M, P], valid [M, P], statistics [M (1 + P)]): in fp32 per row the LSE over the
    allowed columns, then each set's: or, where the backward takes exponents relative to the
    bound, the inverse sums it reads."""
    if _elsewhere(q):
        with torch.cuda.device(q.device):
            return forward(q, k, layout, tau, splits=splits)
    q, k = _operands(q, k, layout)
    plan = _plan(q, layout, tau, splits)
    m, p = layout.rows, layout.sets
    loss = torch.empty_like(plan.loss)
    valid = torch.empty_like(plan.valid)
    stats = plan.loss.new_empty(m * (1 + p))
    _run_forward(plan.forward_rows, plan, q, k, layout, loss, valid, stats)
    if plan.splits > 1:
        plan.finish(
            plan.partial, loss, valid, stats, plan.block_sums, plan.ticket, stats, stats, m, plan.splits, m,
            **plan.finish_rows,
        )  # fmt: skip
    return loss, valid, stats


def forward_mean(q, k, layout, tau, *, splits=None):
    """The masked means of the losses over rows [0, boundary) and [boundary, M), per key set,
    in two launches. Returns (the means of each segment, [P] or a scalar with one key set; the
    statistics tensor ``backward_mean`` reads: per row those ``forward`` would return, then the
    valid counts)."""
    if _elsewhere(q):
        with torch.cuda.device(q.device):
            return forward_mean(q, k, layout, tau, splits=splits)
    q, k = _operands(q, k, layout)
    plan = _plan(q, layout, tau, splits)
    stats = plan.loss.new_empty(plan.mean_stats_size)
    mean0 = torch.empty_like(plan.mean_like)
    mean1 = torch.empty_like(plan.mean_like) if layout.segments == 2 else plan.unused_mean
    _run_forward(plan.forward_means, plan, q, k, layout, plan.loss, plan.valid, stats)
    plan.finish(
        plan.partial, plan.loss, plan.valid, stats, plan.block_sums, plan.ticket, mean0, mean1, layout.rows,
        plan.splits, layout.boundary, **plan.finish_means,
    )  # fmt: skip
    return ((mean0,) if layout.segments == 1 else (mean0, mean1)), stats


def _run_backward(plan, upstream, q, k, layout, stats, mean):
    """(dq, dk), dk None with one tower: one launch, reading the forward's ``stats`` (one a row,
    then those of its path a row, then with ``mean`` the valid counts)."""
    m, d = q.shape
    dq = torch.empty_like(q)
    dk = None if layout.one_tower else torch.empty_like(k)
    launch = plan.backward_launches.get((mean, layout.symmetric)) or _backward_launch(plan, layout, mean)
    launch.run(
        q, k, dq, dq if dk is None else dk, plan.backward_partial, plan.backward_tickets, *upstream, stats,
        layout.row_keys, layout.col_keys, layout.row_groups, layout.col_groups, m, k.shape[0], d,
        layout.self_offset, layout.boundary, plan.scale2, plan.inv_tau, *plan.buckets,
    )  # fmt: skip
    return dq, dk


def backward(grad_loss, q, k, layout, tau, stats, *, splits=None):
    """(dq, dk); dk is None with one tower, where dq already holds (G + G^T) q / tau."""
    if _elsewhere(q):
        with torch.cuda.device(q.device):
            return backward(grad_loss, q, k, layout, tau, stats, splits=splits)
    q, k = _operands(q, k, layout)
    plan = _plan(q, layout, tau, splits)
    grad = grad_loss.float().contiguous()
    upstream = (grad, grad, grad)  # the means' pointers go unread without MEAN
    return _run_backward(plan, upstream, q, k, layout, stats, 0)


def backward_mean(grad_means, q, k, layout, tau, stats, *, splits=None):
    """(dq, dk or None with one tower) of the means of ``forward_mean`` from their upstream
    gradients (one per segment) and ``forward_mean``'s statistics."""
    if _elsewhere(q):
        with torch.cuda.device(q.device):
            return backward_mean(grad_means, q, k, layout, tau, stats, splits=splits)
    q, k = _operands(q, k, layout)
    plan = _plan(q, layout, tau, splits)
    first, last = grad_means[0].float().contiguous(), grad_means[-1].float().contiguous()
    return _run_backward(plan, (first, first, last), q, k, layout, stats, layout.segments)
