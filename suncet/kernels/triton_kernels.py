"""Triton kernels of the fused multi-positive contrastive loss, and their launchers.

Forward: one program per (row tile, column split) walks its column tiles and sums, per row,
``exp2`` of ``s2 = s * log2(e)`` (``log2(e) / tau`` folded into the scale) over the allowed
columns and over each positive set; with more than one split, a small kernel merges the
partial statistics. The rows are unit vectors, so ``s2 <= scale2 = log2(e) / tau``: for tau >=
log2(e) / 48 = 0.03006 ("bounded") every exponent is taken relative to that fixed bound (one
exponential and three adds per entry, no maxima), for smaller tau, where such exponents would
leave fp32's normal range, relative to running maxima (an online log-sum-exp). Backward: one
program per row tile of ``a`` turns (g, lse_all, lse_pos) of its rows, and of each column tile
it visits, into per-row factors (bounded: three, against the same fixed bound; otherwise
exponent offsets and coefficients per membership code), recomputes ``s = a b^T`` tile by tile
and accumulates ``H b`` in fp32, where ``H`` is the gradient of the losses with respect to ``s``
as seen from the rows (row side), from the columns (column side, the transposed term), or both
(one tower: ``dz = (G + G^T) z / tau`` in one pass). Every output element is written by exactly one
program: no atomics, deterministic.

Similarity tiles stay in fp32; bf16/fp16 inputs go to the tensor cores as they are, fp32
inputs through tf32 unless ``set_fp32_precision("ieee")``. Tiles whose row and column groups
cannot meet are not visited (each program first scans the column groups for its range).
See docs/kernels.md for the numerics.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("SUNCET_TRITON_AUTOTUNE", "1") != "0"

_LOG2E = 1.4426950408889634
_FLOOR = tl.constexpr(-1.0e30)  # start of running maxima: finite, so -inf (masked) minus it stays -inf
_DEAD = tl.constexpr(1.0e30)  # exponent offset of rows that receive no gradient: exp2(s - _DEAD) == 0
_SCAN = tl.constexpr(4096)  # column groups read at once by the range scan
_BOUNDED_SCALE2 = 48.0  # tau >= 0.03006: exponents relative to the bound stay within [-97, 0.5]

_fp32_precision = os.environ.get("SUNCET_TRITON_FP32_PRECISION", "tf32")


def set_fp32_precision(mode: str) -> None:
    """How fp32 inputs use the tensor cores: ``"tf32"`` (default) or ``"ieee"`` (exact fp32)."""
    global _fp32_precision
    if mode not in ("tf32", "ieee"):
        raise ValueError(f"fp32 precision must be 'tf32' or 'ieee', got {mode!r}")
    _fp32_precision = mode


def fp32_precision() -> str:
    return _fp32_precision


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per D class (D <= 128, D <= 256); the first entry is
# the one used when autotuning is off. Chosen by compiling candidates ahead of time for sm_90
# (benchmarks/kernel_registers.py: triton.compile with a GPUTarget and ptxas -v, no GPU needed)
# and keeping those that fit Hopper's 227 KiB of shared memory and do not spill registers for bf16
# and fp32 with one or two key sets (a sweep of BLOCK_M 64/128, BLOCK_N 32/64/128, 4/8 warps, 2-4
# stages at D = 128 left these). The one exception: at D = 256 with fp32 inputs and two key sets
# the running-maxima backward spills 8 to 56 bytes a thread in every candidate ((64, 16, 8, 2)
# least). Which is fastest is for the autotuner to find on the card. On the H200 the forward ran
# latency-bound (docs/benchmarks.md): (64, 64, 4, 3) was fastest at 209 registers a thread (two
# programs per multiprocessor), so the two (64, 32, 4, *) tiles, at 148 (three), joined the table.
_FORWARD_TABLE = {
    128: [(128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (128, 32, 8, 4),
          (64, 128, 8, 3), (64, 32, 4, 3), (64, 32, 4, 4)],
    256: [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
}
_BACKWARD_TABLE = {
    128: [(64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3),
          (128, 16, 8, 2)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (64, 16, 8, 2)],
}
# The bounded backward (D <= 128 only): its similarity tile feeds the second product through
# plain arithmetic, so Triton lays the first product over warps along the rows only ([warps, 1]):
# a 64-row tile on 8 warps would compute it twice, hence 128 rows on 8 warps or 64 on 4 (the
# layout flash attention's kernels use). Every tile with BLOCK_N = 64 spills here; at D = 256 every
# candidate spills, so D > 128 keeps the running-maxima backward. The two backward modes differ in
# layout and tiles, so which is faster is not clear from the code: where tau allows the bound, the
# autotuner times the tiles of both (BOUNDED is a tuning parameter of the backward).
_BOUNDED_BACKWARD_TABLE = {
    128: [(128, 32, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 2), (128, 16, 8, 3), (128, 16, 8, 2)],
}
# (128, 16, 8, 2), last in both backward tables, is the one tile that spills in neither mode when
# compiled for an A100 (sm_80, mma.sync), where the others spill 148 to 328 bytes a thread.
# The interpreter runs block operations in NumPy: one small tile, no tuning.
_INTERPRETER_TILE = (16, 16, 4, 1)


def _width(d: int) -> int:
    return 128 if d <= 128 else 256


def _tile(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _config(tile: tuple[int, int, int, int], **constants) -> triton.Config:
    m, n, warps, stages = tile
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, **constants}, num_warps=warps, num_stages=stages)


def _forward_configs() -> list[triton.Config]:
    if INTERPRETING:
        return [_config(_INTERPRETER_TILE)]
    return [_config(tile) for tile in dict.fromkeys(t for tiles in _FORWARD_TABLE.values() for t in tiles)]


def _prune_forward(configs, named_args, **kwargs):
    if INTERPRETING:
        return configs
    tiles = _FORWARD_TABLE[_width(named_args["D"])]
    wanted = tiles if AUTOTUNE else tiles[:1]
    return [c for c in configs if _tile(c) in wanted]


def _backward_candidates(width: int, scale2: float) -> list[tuple[tuple[int, int, int, int], bool]]:
    """(tile, bounded) pairs the backward may run, the first being the one used untuned."""
    candidates = [(tile, False) for tile in _BACKWARD_TABLE[width]]
    if scale2 <= _BOUNDED_SCALE2 and width in _BOUNDED_BACKWARD_TABLE:
        candidates = [(tile, True) for tile in _BOUNDED_BACKWARD_TABLE[width]] + candidates
    return candidates


def _backward_configs() -> list[triton.Config]:
    if INTERPRETING:
        return [_config(_INTERPRETER_TILE, BOUNDED=bounded) for bounded in (True, False)]
    tables = ((_BACKWARD_TABLE, False), (_BOUNDED_BACKWARD_TABLE, True))
    pairs = dict.fromkeys((tile, bounded) for table, bounded in tables for tiles in table.values() for tile in tiles)
    return [_config(tile, BOUNDED=bounded) for tile, bounded in pairs]


def _prune_backward(configs, named_args, **kwargs):
    candidates = _backward_candidates(_width(named_args["D"]), named_args["scale2"])
    if INTERPRETING:
        return [c for c in configs if c.kwargs["BOUNDED"] == candidates[0][1]]
    wanted = candidates if AUTOTUNE else candidates[:1]
    return [c for c in configs if (_tile(c), c.kwargs["BOUNDED"]) in wanted]


@triton.jit
def _tile_group_range(groups_ptr, idx, ok):
    g = tl.load(groups_ptr + idx, mask=ok, other=0)
    lo = tl.min(tl.where(ok, g, 9223372036854775807), 0)
    hi = tl.max(tl.where(ok, g, -9223372036854775807), 0)
    return g, lo, hi


@triton.jit
def _tile_matches(groups_ptr, idx, ok, group):
    """Groups of ``idx`` (0 where not ``ok``), and whether all equal ``group``: one int32
    reduction, where a (min, max) pair of the int64 groups would take two. (A tile with columns
    past the end takes the masked path whatever this says.)"""
    g = tl.load(groups_ptr + idx, mask=ok, other=0)
    return g, tl.max((g != group).to(tl.int32), 0) == 0


@triton.jit
def _column_tile_span(groups_a_ptr, lo_a, hi_a, groups_b_ptr, lo_b, hi_b, N, BOTH: tl.constexpr, BLOCK_N: tl.constexpr):
    """First and one-past-last column tile whose groups meet [lo_a, hi_a] (and, with BOTH,
    whose second group array meets [lo_b, hi_b])."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    first = n_tiles
    last = 0
    for start in range(0, N, _SCAN):
        idx = start + tl.arange(0, _SCAN)
        ok = idx < N
        g = tl.load(groups_a_ptr + idx, mask=ok, other=0)
        tile_lo = tl.min(tl.reshape(tl.where(ok, g, 9223372036854775807), (_SCAN // BLOCK_N, BLOCK_N)), 1)
        tile_hi = tl.max(tl.reshape(tl.where(ok, g, -9223372036854775807), (_SCAN // BLOCK_N, BLOCK_N)), 1)
        hit = (tile_lo <= hi_a) & (lo_a <= tile_hi)
        if BOTH:
            g2 = tl.load(groups_b_ptr + idx, mask=ok, other=0)
            lo2 = tl.min(tl.reshape(tl.where(ok, g2, 9223372036854775807), (_SCAN // BLOCK_N, BLOCK_N)), 1)
            hi2 = tl.max(tl.reshape(tl.where(ok, g2, -9223372036854775807), (_SCAN // BLOCK_N, BLOCK_N)), 1)
            hit = hit | ((lo2 <= hi_b) & (lo_b <= hi2))
        tile = start // BLOCK_N + tl.arange(0, _SCAN // BLOCK_N)
        first = tl.minimum(first, tl.min(tl.where(hit, tile, n_tiles), 0))
        last = tl.maximum(last, tl.max(tl.where(hit, tile + 1, 0), 0))
    return first, last


@triton.jit
def _load_rows(ptr, idx, ok, dims, D, EVEN_D: tl.constexpr):
    """Rows ``idx`` of a [*, D] matrix, zero beyond ``ok`` and beyond D. With EVEN_D the mask is
    constant along D, which keeps the loads vectorised."""
    if EVEN_D:
        return tl.load(ptr + idx[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
    else:
        return tl.load(ptr + idx[:, None] * D + dims[None, :], mask=ok[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def _select_code(member0, member1, t0, t1, t2, t3, P: tl.constexpr):
    """Per entry, the table value of its membership code (bit p: positive of key set p)."""
    if P == 1:
        return tl.where(member0, t1, t0)
    else:
        return tl.where(member0, tl.where(member1, t3, t1), tl.where(member1, t2, t0))


@triton.autotune(
    configs=_forward_configs(),
    key=["M", "N", "D", "P", "BOUNDED"],
    prune_configs_by={"early_config_prune": _prune_forward},
)
@triton.jit(do_not_specialize=["self_offset"])  # one compilation for every rank's offset
def _forward_kernel(
    q_ptr, k_ptr, row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr,
    partial_ptr, loss_ptr, valid_ptr, lse_all_ptr, lse_pos_ptr,
    M, N, D, self_offset, scale2,
    P: tl.constexpr, BOUNDED: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row0 = pid * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dims = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, rows, row_ok, dims, D, EVEN_D)
    row_group, rg_lo, rg_hi = _tile_group_range(row_groups_ptr, rows, row_ok)
    key0 = tl.load(row_keys_ptr + rows * P, mask=row_ok, other=0)
    key1 = key0
    if P == 2:
        key1 = tl.load(row_keys_ptr + rows * P + 1, mask=row_ok, other=0)

    # BOUNDED: every exponent is taken relative to the bound scale2 of s2 (unit rows), which the
    # maxima then hold throughout; otherwise they are running maxima.
    start = scale2 if BOUNDED else _FLOOR
    max_all = tl.full([BLOCK_M], start, tl.float32)
    sum_all = tl.zeros([BLOCK_M], tl.float32)
    max0 = tl.full([BLOCK_M], start, tl.float32)
    sum0 = tl.zeros([BLOCK_M], tl.float32)
    max1 = tl.full([BLOCK_M], start, tl.float32)
    sum1 = tl.zeros([BLOCK_M], tl.float32)

    first, last = _column_tile_span(col_groups_ptr, rg_lo, rg_hi, col_groups_ptr, rg_lo, rg_hi, N, False, BLOCK_N)
    per_split = tl.cdiv(last - first, splits)
    t_begin = first + split * per_split
    t_end = tl.minimum(t_begin + per_split, last)
    for t in range(t_begin, t_end):
        col0 = t * BLOCK_N
        cols = col0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        col_group, cols_match = _tile_matches(col_groups_ptr, cols, col_ok, rg_lo)
        k = _load_rows(k_ptr, cols, col_ok, dims, D, EVEN_D)
        s2 = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
        if BOUNDED:
            s2 -= scale2
        uniform = (rg_lo == rg_hi) & cols_match
        diagonal = (row0 + self_offset < col0 + BLOCK_N) & (col0 < row0 + BLOCK_M + self_offset)
        if (col0 + BLOCK_N > N) | (uniform == 0) | diagonal:
            allowed = (
                col_ok[None, :]
                & (row_group[:, None] == col_group[None, :])
                & (cols[None, :] != rows[:, None] + self_offset)
            )
            s2 = tl.where(allowed, s2, float("-inf"))
        member0 = key0[:, None] == tl.load(col_keys_ptr + cols * P, mask=col_ok, other=0)[None, :]
        member1 = member0
        if P == 2:
            member1 = key1[:, None] == tl.load(col_keys_ptr + cols * P + 1, mask=col_ok, other=0)[None, :]

        if BOUNDED:
            e = tl.exp2(s2)
            sum_all += tl.sum(e, 1)
            sum0 += tl.sum(tl.where(member0, e, 0.0), 1)
            if P == 2:
                sum1 += tl.sum(tl.where(member1, e, 0.0), 1)
        else:
            new_all = tl.maximum(max_all, tl.max(s2, 1))
            sum_all = sum_all * tl.exp2(max_all - new_all)
            max_all = new_all
            new0 = tl.maximum(max0, tl.max(tl.where(member0, s2, float("-inf")), 1))
            sum0 = sum0 * tl.exp2(max0 - new0)
            max0 = new0
            if P == 2:
                new1 = tl.maximum(max1, tl.max(tl.where(member1, s2, float("-inf")), 1))
                sum1 = sum1 * tl.exp2(max1 - new1)
                max1 = new1
            # One exponential per entry, relative to the smallest maximum among its sets; per-row
            # factors (<= 1) carry it over to the other sums.
            both = tl.minimum(max0, max1)
            offset = _select_code(member0, member1, max_all[:, None], max0[:, None], max1[:, None], both[:, None], P)
            e = tl.exp2(s2 - offset)
            to_all = _select_code(
                member0, member1, 1.0,
                tl.exp2(max0 - max_all)[:, None], tl.exp2(max1 - max_all)[:, None], tl.exp2(both - max_all)[:, None], P,
            )  # fmt: skip
            sum_all += tl.sum(e * to_all, 1)
            if P == 1:
                sum0 += tl.sum(tl.where(member0, e, 0.0), 1)
            else:
                sum0 += tl.sum(tl.where(member0, e * tl.where(member1, tl.exp2(both - max0)[:, None], 1.0), 0.0), 1)
                sum1 += tl.sum(tl.where(member1, e * tl.where(member0, tl.exp2(both - max1)[:, None], 1.0), 0.0), 1)

    if splits == 1:
        _finalize_rows(
            rows, row_ok, max_all, sum_all, max0, sum0, max1, sum1, loss_ptr, valid_ptr, lse_all_ptr, lse_pos_ptr, P
        )
    else:
        base = partial_ptr + split * (2 + 2 * P) * M + rows
        tl.store(base, max_all, mask=row_ok)
        tl.store(base + M, sum_all, mask=row_ok)
        tl.store(base + 2 * M, max0, mask=row_ok)
        tl.store(base + 3 * M, sum0, mask=row_ok)
        if P == 2:
            tl.store(base + 4 * M, max1, mask=row_ok)
            tl.store(base + 5 * M, sum1, mask=row_ok)


@triton.jit
def _finalize_rows(
    rows,
    row_ok,
    max_all,
    sum_all,
    max0,
    sum0,
    max1,
    sum1,
    loss_ptr,
    valid_ptr,
    lse_all_ptr,
    lse_pos_ptr,
    P: tl.constexpr,
):
    ln2 = 0.6931471805599453
    # log2 of a positive stand-in where a sum is 0, so that no -inf - -inf is ever formed.
    lse_all2 = tl.where(sum_all > 0, max_all + tl.log2(tl.where(sum_all > 0, sum_all, 1.0)), float("-inf"))
    tl.store(lse_all_ptr + rows, lse_all2 * ln2, mask=row_ok)
    valid0 = sum0 > 0
    lse02 = tl.where(valid0, max0 + tl.log2(tl.where(valid0, sum0, 1.0)), float("-inf"))
    tl.store(lse_pos_ptr + rows * P, lse02 * ln2, mask=row_ok)
    tl.store(valid_ptr + rows * P, valid0, mask=row_ok)
    tl.store(loss_ptr + rows * P, tl.where(valid0, (lse_all2 - tl.where(valid0, lse02, 0.0)) * ln2, 0.0), mask=row_ok)
    if P == 2:
        valid1 = sum1 > 0
        lse12 = tl.where(valid1, max1 + tl.log2(tl.where(valid1, sum1, 1.0)), float("-inf"))
        tl.store(lse_pos_ptr + rows * P + 1, lse12 * ln2, mask=row_ok)
        tl.store(valid_ptr + rows * P + 1, valid1, mask=row_ok)
        tl.store(
            loss_ptr + rows * P + 1, tl.where(valid1, (lse_all2 - tl.where(valid1, lse12, 0.0)) * ln2, 0.0), mask=row_ok
        )


@triton.jit
def _merge(partial_ptr, stat, splits, rows, row_ok, M, STATS: tl.constexpr, BLOCK: tl.constexpr):
    top = tl.full([BLOCK], _FLOOR, tl.float32)
    for split in range(0, splits):
        top = tl.maximum(top, tl.load(partial_ptr + (split * STATS + stat) * M + rows, mask=row_ok, other=_FLOOR))
    total = tl.zeros([BLOCK], tl.float32)
    for split in range(0, splits):
        m = tl.load(partial_ptr + (split * STATS + stat) * M + rows, mask=row_ok, other=_FLOOR)
        s = tl.load(partial_ptr + (split * STATS + stat + 1) * M + rows, mask=row_ok, other=0.0)
        total += s * tl.exp2(m - top)
    return top, total


@triton.jit
def _combine_kernel(
    partial_ptr, loss_ptr, valid_ptr, lse_all_ptr, lse_pos_ptr, M, splits, P: tl.constexpr, BLOCK: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    max_all, sum_all = _merge(partial_ptr, 0, splits, rows, row_ok, M, 2 + 2 * P, BLOCK)
    max0, sum0 = _merge(partial_ptr, 2, splits, rows, row_ok, M, 2 + 2 * P, BLOCK)
    max1 = max0
    sum1 = sum0
    if P == 2:
        max1, sum1 = _merge(partial_ptr, 4, splits, rows, row_ok, M, 2 + 2 * P, BLOCK)
    _finalize_rows(
        rows, row_ok, max_all, sum_all, max0, sum0, max1, sum1, loss_ptr, valid_ptr, lse_all_ptr, lse_pos_ptr, P
    )


@triton.jit
def _gradient_tables(grad_ptr, lse_all_ptr, lse_pos_ptr, idx, ok, P: tl.constexpr):
    """Per row ``idx`` of q and membership code c: the exponent offset (log2 units) and
    coefficient with dL/ds_ij = coef_c(i) * exp2(s2_ij - offset_c(i)); returns the offsets of
    codes 0..3, then their coefficients (codes 2 and 3 repeat 0 when P == 1). Rows that are not
    ``ok`` or receive no gradient get offset _DEAD and coefficient 0."""
    log2e = 1.4426950408889634
    lse_all = tl.load(lse_all_ptr + idx, mask=ok, other=0.0) * log2e
    lse0 = tl.load(lse_pos_ptr + idx * P, mask=ok, other=float("-inf"))
    valid0 = lse0 > float("-inf")
    lse0 = tl.where(valid0, lse0 * log2e, 0.0)
    g0 = tl.where(valid0, tl.load(grad_ptr + idx * P, mask=ok, other=0.0), 0.0)
    if P == 1:
        o0 = tl.where(valid0, lse_all, _DEAD)
        o1 = tl.where(valid0, lse0, _DEAD)
        c1 = tl.where(valid0, g0 * (tl.exp2(lse0 - lse_all) - 1.0), 0.0)
        return o0, o1, o0, o0, g0, c1, g0, g0
    else:
        lse1 = tl.load(lse_pos_ptr + idx * P + 1, mask=ok, other=float("-inf"))
        valid1 = lse1 > float("-inf")
        lse1 = tl.where(valid1, lse1 * log2e, 0.0)
        g1 = tl.where(valid1, tl.load(grad_ptr + idx * P + 1, mask=ok, other=0.0), 0.0)
        g_sum = g0 + g1
        both = valid0 & valid1
        o3 = tl.minimum(lse0, lse1)
        c3 = g_sum * tl.exp2(o3 - lse_all) - g0 * tl.exp2(o3 - lse0) - g1 * tl.exp2(o3 - lse1)
        return (
            tl.where(valid0 | valid1, lse_all, _DEAD),
            tl.where(valid0, lse0, _DEAD),
            tl.where(valid1, lse1, _DEAD),
            tl.where(both, o3, _DEAD),
            g_sum,
            tl.where(valid0, g_sum * tl.exp2(lse0 - lse_all) - g0, 0.0),
            tl.where(valid1, g_sum * tl.exp2(lse1 - lse_all) - g1, 0.0),
            tl.where(both, c3, 0.0),
        )


@triton.jit
def _bounded_gradient_factors(grad_ptr, lse_all_ptr, lse_pos_ptr, idx, ok, scale2, P: tl.constexpr):
    """Per row ``idx`` of q, with every exponent taken relative to the bound scale2:
    dL/ds_ij = exp2(s2_ij - scale2) * (all_i - [j in set 0] pos0_i - [j in set 1] pos1_i),
    where all_i = (g0 + g1) exp2(scale2 - lse_all_i) and pos_p = g_p exp2(scale2 - lse_p) (LSEs
    in log2 units). Unit rows keep scale2 - lse <= 2 * 1.01 * scale2 <= 97, so the factors stay finite; rows
    that are not ``ok`` or receive no gradient get zeros."""
    log2e = 1.4426950408889634
    lse_all = tl.load(lse_all_ptr + idx, mask=ok, other=0.0) * log2e
    lse0 = tl.load(lse_pos_ptr + idx * P, mask=ok, other=float("-inf")) * log2e
    valid0 = lse0 > float("-inf")
    g0 = tl.where(valid0, tl.load(grad_ptr + idx * P, mask=ok, other=0.0), 0.0)
    pos0 = g0 * tl.exp2(scale2 - tl.where(valid0, lse0, scale2))
    g_sum = g0
    pos1 = pos0
    valid = valid0
    if P == 2:
        lse1 = tl.load(lse_pos_ptr + idx * P + 1, mask=ok, other=float("-inf")) * log2e
        valid1 = lse1 > float("-inf")
        g1 = tl.where(valid1, tl.load(grad_ptr + idx * P + 1, mask=ok, other=0.0), 0.0)
        pos1 = g1 * tl.exp2(scale2 - tl.where(valid1, lse1, scale2))
        g_sum += g1
        valid = valid | valid1
    # A row with no valid set may have lse_all = -inf (nothing allowed): no exp2(+inf) * 0.
    return g_sum * tl.exp2(scale2 - tl.where(valid, lse_all, scale2)), pos0, pos1


@triton.jit
def _bounded_weight(member0, member1, all_, pos0, pos1, P: tl.constexpr):
    w = all_ - tl.where(member0, pos0, 0.0)
    if P == 2:
        w -= tl.where(member1, pos1, 0.0)
    return w


@triton.autotune(
    configs=_backward_configs(),
    key=["A_COUNT", "B_COUNT", "D", "P", "scale2"],
    prune_configs_by={"early_config_prune": _prune_backward},
)
@triton.jit(do_not_specialize=["self_offset"])
def _backward_kernel(
    a_ptr, b_ptr, out_ptr, grad_ptr, lse_all_ptr, lse_pos_ptr,
    row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr,
    A_COUNT, B_COUNT, D, self_offset, scale2, inv_tau,
    P: tl.constexpr, ROW_SIDE: tl.constexpr, COL_SIDE: tl.constexpr, BOUNDED: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """d a = (1/tau) sum_b H_ab b_b. Row side: a are rows of q (keys row_keys), b are
    columns of k. Column side: a are columns of k, b are rows of q (the transposed term)."""
    pid = tl.program_id(0)
    row0 = pid * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < A_COUNT
    dims = tl.arange(0, BLOCK_D)
    a = _load_rows(a_ptr, rows, row_ok, dims, D, EVEN_D)

    # Row side: this program's rows as rows of q.
    r_group, r_lo, r_hi = _tile_group_range(row_groups_ptr, rows, row_ok & ROW_SIDE)
    r_key0 = tl.load(row_keys_ptr + rows * P, mask=row_ok & ROW_SIDE, other=0)
    r_key1 = r_key0
    if P == 2:
        r_key1 = tl.load(row_keys_ptr + rows * P + 1, mask=row_ok & ROW_SIDE, other=0)
    if BOUNDED:
        r_all, r_pos0, r_pos1 = _bounded_gradient_factors(
            grad_ptr, lse_all_ptr, lse_pos_ptr, rows, row_ok & ROW_SIDE, scale2, P
        )
    else:
        ro0, ro1, ro2, ro3, rc0, rc1, rc2, rc3 = _gradient_tables(
            grad_ptr, lse_all_ptr, lse_pos_ptr, rows, row_ok & ROW_SIDE, P
        )
    # Column side: this program's rows as columns of k.
    c_group, c_lo, c_hi = _tile_group_range(col_groups_ptr, rows, row_ok & COL_SIDE)
    c_key0 = tl.load(col_keys_ptr + rows * P, mask=row_ok & COL_SIDE, other=0)
    c_key1 = c_key0
    if P == 2:
        c_key1 = tl.load(col_keys_ptr + rows * P + 1, mask=row_ok & COL_SIDE, other=0)

    if ROW_SIDE:
        first, last = _column_tile_span(
            col_groups_ptr, r_lo, r_hi, row_groups_ptr, c_lo, c_hi, B_COUNT, COL_SIDE, BLOCK_N
        )
    else:
        first, last = _column_tile_span(row_groups_ptr, c_lo, c_hi, row_groups_ptr, c_lo, c_hi, B_COUNT, False, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(first, last):
        col0 = t * BLOCK_N
        cols = col0 + tl.arange(0, BLOCK_N)
        col_ok = cols < B_COUNT
        b = _load_rows(b_ptr, cols, col_ok, dims, D, EVEN_D)
        s2 = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        if BOUNDED:
            # One exponential per entry serves both sides: their offsets are all scale2.
            e = tl.exp2(s2 - scale2)
        h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if ROW_SIDE:
            b_group, b_match = _tile_matches(col_groups_ptr, cols, col_ok, r_lo)
            member0 = r_key0[:, None] == tl.load(col_keys_ptr + cols * P, mask=col_ok, other=0)[None, :]
            member1 = member0
            if P == 2:
                member1 = r_key1[:, None] == tl.load(col_keys_ptr + cols * P + 1, mask=col_ok, other=0)[None, :]
            if BOUNDED:
                g = _bounded_weight(member0, member1, r_all[:, None], r_pos0[:, None], r_pos1[:, None], P)
            else:
                offset = _select_code(member0, member1, ro0[:, None], ro1[:, None], ro2[:, None], ro3[:, None], P)
                coef = _select_code(member0, member1, rc0[:, None], rc1[:, None], rc2[:, None], rc3[:, None], P)
                g = coef * tl.exp2(s2 - offset)
            uniform = (r_lo == r_hi) & b_match
            diagonal = (row0 + self_offset < col0 + BLOCK_N) & (col0 < row0 + BLOCK_M + self_offset)
            if (col0 + BLOCK_N > B_COUNT) | (uniform == 0) | diagonal:
                allowed = (
                    col_ok[None, :]
                    & (r_group[:, None] == b_group[None, :])
                    & (cols[None, :] != rows[:, None] + self_offset)
                )
                g = tl.where(allowed, g, 0.0)
            h += g
        if COL_SIDE:
            b_group, b_match = _tile_matches(row_groups_ptr, cols, col_ok, c_lo)
            member0 = c_key0[:, None] == tl.load(row_keys_ptr + cols * P, mask=col_ok, other=0)[None, :]
            member1 = member0
            if P == 2:
                member1 = c_key1[:, None] == tl.load(row_keys_ptr + cols * P + 1, mask=col_ok, other=0)[None, :]
            if BOUNDED:
                c_all, c_pos0, c_pos1 = _bounded_gradient_factors(
                    grad_ptr, lse_all_ptr, lse_pos_ptr, cols, col_ok, scale2, P
                )
                g = _bounded_weight(member0, member1, c_all[None, :], c_pos0[None, :], c_pos1[None, :], P)
            else:
                co0, co1, co2, co3, cc0, cc1, cc2, cc3 = _gradient_tables(
                    grad_ptr, lse_all_ptr, lse_pos_ptr, cols, col_ok, P
                )
                offset = _select_code(member0, member1, co0[None, :], co1[None, :], co2[None, :], co3[None, :], P)
                coef = _select_code(member0, member1, cc0[None, :], cc1[None, :], cc2[None, :], cc3[None, :], P)
                g = coef * tl.exp2(s2 - offset)
            uniform = (c_lo == c_hi) & b_match
            diagonal = (col0 + self_offset < row0 + BLOCK_M) & (row0 < col0 + BLOCK_N + self_offset)
            if (col0 + BLOCK_N > B_COUNT) | (uniform == 0) | diagonal:
                allowed = (
                    col_ok[None, :]
                    & (c_group[:, None] == b_group[None, :])
                    & (rows[:, None] != cols[None, :] + self_offset)
                )
                g = tl.where(allowed, g, 0.0)
            h += g
        if BOUNDED:
            h *= e
        acc += tl.dot(h.to(b.dtype), b, input_precision=PRECISION)
    out = (acc * inv_tau).to(out_ptr.dtype.element_ty)
    if EVEN_D:
        tl.store(out_ptr + rows[:, None] * D + dims[None, :], out, mask=row_ok[:, None])
    else:
        tl.store(out_ptr + rows[:, None] * D + dims[None, :], out, mask=row_ok[:, None] & (dims < D)[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers.


def last_configs() -> list[str]:
    """The tile (BLOCK_M, BLOCK_N, warps, stages) and mode each kernel ran with last, for benchmark notes."""
    notes = []
    for name, kernel in (("forward", _forward_kernel), ("backward", _backward_kernel)):
        config = getattr(kernel, "best_config", None)
        if config is not None:
            mode = {True: ", bounded", False: ", running maxima"}.get(config.kwargs.get("BOUNDED"), "")
            notes.append(f"{name} tile {_tile(config)}{mode}")
    return notes


def _bounded(tau: float) -> bool:
    """Whether exponents may be taken relative to the fixed bound log2(e) / tau of s2 (unit
    rows) instead of running maxima: they then span at most 2 * 1.01 * log2(e) / tau, which must
    stay clear of fp32's smallest normal exponent (-126) for the sums to keep full precision."""
    return _LOG2E / tau <= _BOUNDED_SCALE2


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return _fp32_precision if dtype == torch.float32 else "tf32"


def _forward_splits(m: int, n: int, device: torch.device) -> int:
    """Column splits that bring the forward grid to about four 128-row programs per
    multiprocessor, each split keeping at least 1,024 columns.

    Several waves of programs keep the last one's idle share small whatever the autotuned tile
    turns out to fit per multiprocessor. At N = 8192 on 132 multiprocessors, (64, 32, 4, 3) fits
    four programs by registers: 5 splits (the earlier target of two per multiprocessor) made
    640 programs, 1.2 waves, the second one 21% busy; 8 make 1,024, 1.94 waves."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_tiles = triton.cdiv(m, 128)
    return max(1, min(triton.cdiv(4 * sms, row_tiles), n // 1024, 8))


def forward(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower, *, splits=None):
    """(loss [M, P], valid [M, P], lse_all [M], lse_pos [M, P]); statistics in fp32."""
    q = q.contiguous()
    k = q if one_tower else k.contiguous()
    m, d = q.shape
    n = k.shape[0]
    p = row_keys.shape[1]
    f32 = dict(device=q.device, dtype=torch.float32)
    loss = torch.empty((m, p), **f32)
    valid = torch.empty((m, p), device=q.device, dtype=torch.bool)
    lse_all = torch.empty((m,), **f32)
    lse_pos = torch.empty((m, p), **f32)
    splits = splits or _forward_splits(m, n, q.device)
    partial = torch.empty((splits, 2 + 2 * p, m), **f32) if splits > 1 else lse_all

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), splits)

    _forward_kernel[grid](
        q, k, row_keys, col_keys, row_groups, col_groups,
        partial, loss, valid, lse_all, lse_pos,
        m, n, d, self_offset, _LOG2E / tau,
        P=p, BOUNDED=_bounded(tau), BLOCK_D=_block_d(d), EVEN_D=_block_d(d) == d, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    if splits > 1:
        block = 128
        _combine_kernel[(triton.cdiv(m, block),)](partial, loss, valid, lse_all, lse_pos, m, splits, P=p, BLOCK=block)
    return loss, valid, lse_all, lse_pos


def backward(
    grad_loss, q, k, row_keys, col_keys, row_groups, col_groups, lse_all, lse_pos, self_offset, tau, one_tower
):
    """(dq, dk); dk is empty with one_tower, where dq already holds (G + G^T) q / tau."""
    q = q.contiguous()
    k = q if one_tower else k.contiguous()
    m, d = q.shape
    n = k.shape[0]
    p = row_keys.shape[1]
    # Each program derives the per-row coefficients it needs from these (no separate launch).
    stats = (grad_loss.float().contiguous(), lse_all, lse_pos)
    common = dict(P=p, BLOCK_D=_block_d(d), EVEN_D=_block_d(d) == d, PRECISION=_precision(q.dtype))
    keys = (row_keys, col_keys, row_groups, col_groups)
    scale2, inv_tau = _LOG2E / tau, 1.0 / tau
    dq = torch.empty_like(q)

    def grid_for(count):
        return lambda meta: (triton.cdiv(count, meta["BLOCK_M"]),)

    if one_tower:
        _backward_kernel[grid_for(m)](
            q, q, dq, *stats, *keys, m, m, d, self_offset, scale2, inv_tau, ROW_SIDE=True, COL_SIDE=True, **common
        )
        return dq, q.new_empty((0, d))
    dk = torch.empty_like(k)
    _backward_kernel[grid_for(m)](
        q, k, dq, *stats, *keys, m, n, d, self_offset, scale2, inv_tau, ROW_SIDE=True, COL_SIDE=False, **common
    )
    _backward_kernel[grid_for(n)](
        k, q, dk, *stats, *keys, n, m, d, self_offset, scale2, inv_tau, ROW_SIDE=False, COL_SIDE=True, **common
    )
    return dq, dk
