"""Launchers of the Triton loss kernels: the entry points ``forward``, ``backward``,
``forward_mean`` and ``backward_mean`` that suncet/kernels/backends.py calls.

Each entry point takes the launch plan of its shapes, dtype, device, tau and layout (``_Plan``:
grids, compile-time constants, column splits and scratch buffers, made once per such
combination, so that a step spends its host time on launches) and launches the kernels of
triton_kernels.py on it. The choices a plan is made of (exponent mode, tiles, splits) are those
of triton_tiles.py. How fp32 inputs use the tensor cores (``set_fp32_precision``) is set here
and is part of each plan's key.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton

from suncet.kernels import triton_kernels as kernels
from suncet.kernels import triton_tiles as tiles

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


class _Plan:
    """What a launch needs that depends only on shapes, dtype, device, tau and layout, made once
    per such combination: grids, compile-time constants, and scratch buffers that live only
    within one kernel or between the forward kernel and the finishing one of the same call
    (stream order keeps one call's use of them before the next call's; calls on another stream,
    or while a graph is captured, get plans of their own: ``_plan``). A step then spends its host
    time on launches.
    ``splits`` overrides the column splits of both directions."""

    def __init__(self, m, n, d, p, dtype, device, tau, one_tower, splits):
        f32 = dict(device=device, dtype=torch.float32)
        sms = _multiprocessors(device)
        self.splits = splits or tiles.forward_splits(m, n, sms)
        check_int32_offsets(m, n, d, p, self.splits)
        self.bounded_backward = tiles.bounded_backward(tau, d)
        self.scale2, self.inv_tau = tiles.LOG2E / tau, 1.0 / tau
        common = dict(P=p, BLOCK_D=tiles.block_d(d), EVEN_D=tiles.block_d(d) == d, PRECISION=_precision(dtype))
        self.forward_constants = dict(
            **common, BOUNDED=tiles.bounded(tau), INVERSE=self.bounded_backward, CHECK_K=not one_tower
        )
        self.backward_constants = dict(**common, BOUNDED=self.bounded_backward)
        # Statistics per row of the masked-means path: in the bounded backward, each set's
        # share of the denominator's inverse as well (no validity test per column).
        self.mean_stats = 2 * p if self.bounded_backward else p
        self.backward_variants: dict[tuple, dict] = {}
        self.finish = dict(P=p, INVERSE=self.bounded_backward, BLOCK=tiles.FINISH_BLOCK)
        self.forward_grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), self.splits)
        self.finish_grid = (triton.cdiv(m, tiles.FINISH_BLOCK),)
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
        self.block_sums = torch.empty((self.finish_grid[0], 4 * p), **f32)
        self.ticket = torch.zeros(1, device=device, dtype=torch.int32)


def check_int32_offsets(m: int, n: int, d: int, p: int, splits: int) -> None:
    """The kernels index rows (``row * D``) and the forward's partial statistics in int32:
    refuse shapes whose offsets would pass 2^31 rather than read or write the wrong memory."""
    largest = max(max(m, n) * tiles.block_d(d), splits * (2 + 2 * p) * m)
    if largest >= 2**31:
        raise ValueError(f"{m} x {n} rows of width {d} exceed the triton kernels' int32 offsets (2^31); "
                         "split the batch, or use the cpu or reference backend")


# Plans hold scratch buffers and split tickets that a launch uses from start to end: two
# overlapping launches must not share them. The key therefore holds the CUDA stream and whether
# it is capturing a graph (a buffer made during capture is zeroed only when the graph replays),
# and the cache keeps the most recent plans only.
_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
MAX_PLANS = 32


def _stream_key(device: torch.device) -> tuple:
    if device.type != "cuda":
        return ()
    return torch.cuda.current_stream(device).cuda_stream, torch.cuda.is_current_stream_capturing()


def _plan(q: torch.Tensor, n: int, p: int, tau: float, one_tower: bool, splits: int | None = None) -> _Plan:
    m, d = q.shape
    key = (m, n, d, p, q.dtype, q.device, tau, one_tower, splits, _fp32_precision, *_stream_key(q.device))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(m, n, d, p, q.dtype, q.device, tau, one_tower, splits)
        if len(_PLANS) > MAX_PLANS:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def _launch_forward(plan, q, k, keys, loss, valid, stats_all, stats_pos, per_row, self_offset) -> None:
    """The forward kernel, writing ``per_row`` statistics a row to ``stats_pos`` (and one to ``stats_all``)."""
    m, d = q.shape
    kernels.forward_kernel[plan.forward_grid](
        q, k, *keys, plan.partial, loss, valid, stats_all, stats_pos, m, k.shape[0], d, self_offset, plan.scale2,
        STATS=per_row, **plan.forward_constants,
    )  # fmt: skip


def forward(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower, *, splits=None):
    """(loss [M, P], valid [M, P], stats_all [M], stats_pos [M, P]); statistics in fp32: the LSEs,
    or, where the backward takes exponents relative to the bound, the inverse sums it reads."""
    q = q.contiguous()
    k = q if one_tower else k.contiguous()
    m, p = q.shape[0], row_keys.shape[1]
    plan = _plan(q, k.shape[0], p, tau, one_tower, splits)
    loss = torch.empty((m, p), device=q.device, dtype=torch.float32)
    valid = torch.empty((m, p), device=q.device, dtype=torch.bool)
    stats_all = torch.empty((m,), device=q.device, dtype=torch.float32)
    stats_pos = torch.empty((m, p), device=q.device, dtype=torch.float32)
    keys = (row_keys, col_keys, row_groups, col_groups)
    _launch_forward(plan, q, k, keys, loss, valid, stats_all, stats_pos, p, self_offset)
    if plan.splits > 1:
        kernels.finish_kernel[plan.finish_grid](
            plan.partial, loss, valid, stats_all, stats_pos, plan.block_sums, plan.ticket, stats_all, m, plan.splits, m,
            STATS=p, MERGE=True, MEANS=False, **plan.finish,
        )  # fmt: skip
    return loss, valid, stats_all, stats_pos


def forward_mean(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower, boundary, *, splits=None):
    """The masked means of the losses over rows [0, boundary) and [boundary, M), per key set,
    in two launches. Returns (means [2 P], by segment then set; state): the state is what
    ``backward_mean`` takes back, one buffer holding the statistics ``forward`` would return and
    (means, valid counts) by (segment, set), and the launch plan."""
    q = q.contiguous()
    k = q if one_tower else k.contiguous()
    m, p = q.shape[0], row_keys.shape[1]
    plan = _plan(q, k.shape[0], p, tau, one_tower, splits)
    per_row = plan.mean_stats
    buffer = torch.empty(m * (1 + per_row) + 4 * p, device=q.device, dtype=torch.float32)
    stats_pos, out = buffer[m:], buffer[m * (1 + per_row) :]
    keys = (row_keys, col_keys, row_groups, col_groups)
    _launch_forward(plan, q, k, keys, plan.loss, plan.valid, buffer, stats_pos, per_row, self_offset)
    kernels.finish_kernel[plan.finish_grid](
        plan.partial, plan.loss, plan.valid, buffer, stats_pos, plan.block_sums, plan.ticket, out, m, plan.splits,
        boundary, STATS=per_row, MERGE=plan.splits > 1, MEANS=True, **plan.finish,
    )  # fmt: skip
    return out[: 2 * p], (buffer, plan)


def _launch_backward(plan, upstream, q, k, keys, stats_all, stats_pos, per_row, self_offset, boundary, one_tower, mean):
    """(dq, dk), dk None with one tower: one launch, reading ``per_row`` statistics a row at ``stats_pos``."""
    m, d = q.shape
    symmetric = one_tower and keys[0] is keys[1] and keys[2] is keys[3]
    constants = plan.backward_variants.get((mean, symmetric, per_row))
    if constants is None:
        constants = plan.backward_variants[(mean, symmetric, per_row)] = dict(
            MEAN=mean[0], HAS=mean[1], SYMMETRIC=symmetric, STATS=per_row, TWO_SIDES=not one_tower,
            **plan.backward_constants,
        )  # fmt: skip
    dq = torch.empty_like(q)
    dk = None if one_tower else torch.empty_like(k)
    kernels.backward_kernel[plan.backward_grid](
        q, k, dq, dq if one_tower else dk, plan.backward_partial, plan.backward_tickets, *upstream,
        stats_all, stats_pos, *keys, m, k.shape[0], d, self_offset, boundary, plan.scale2, plan.inv_tau, **constants,
    )  # fmt: skip
    return dq, dk


def backward(
    grad_loss, q, k, row_keys, col_keys, row_groups, col_groups, stats_all, stats_pos, self_offset, tau, one_tower,
    *, splits=None,
):  # fmt: skip
    """(dq, dk); dk is empty with one_tower, where dq already holds (G + G^T) q / tau."""
    q = q.contiguous()
    k = q if one_tower else k.contiguous()
    plan = _plan(q, k.shape[0], row_keys.shape[1], tau, one_tower, splits)
    grad = grad_loss.float().contiguous()
    keys = (row_keys, col_keys, row_groups, col_groups)
    upstream = (grad, grad, grad, grad)  # the mean-gradient pointers go unread without MEAN
    dq, dk = _launch_backward(
        plan, upstream, q, k, keys, stats_all, stats_pos, stats_pos.shape[1], self_offset, q.shape[0], one_tower, (0, 0)
    )
    return dq, q.new_empty((0, q.shape[1])) if dk is None else dk


def backward_mean(grad_means, state, q, k, row_keys, col_keys, row_groups, col_groups, self_offset, one_tower, boundary):
    """(dq, dk or None with one tower) of the means of ``forward_mean``, from its ``state``;
    ``grad_means`` holds each segment's upstream gradient ([P]), None for a segment whose mean
    received none."""
    buffer, plan = state
    q = q.contiguous()
    k = q if one_tower else k.contiguous()
    m = q.shape[0]
    per_row = plan.mean_stats
    out = buffer[m * (1 + per_row) :]
    has = 0
    upstream = [out, out]
    for segment, grad in enumerate(grad_means):
        if grad is not None:
            has |= 1 << segment
            upstream[segment] = grad if grad.dtype == torch.float32 and grad.is_contiguous() else grad.float().contiguous()
    keys = (row_keys, col_keys, row_groups, col_groups)
    segments = 1 if boundary >= m else 2
    return _launch_backward(
        plan, (out, *upstream, out), q, k, keys, buffer, buffer[m:], per_row, self_offset, boundary, one_tower,
        (segments, has),
    )  # fmt: skip
