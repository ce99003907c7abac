"""Triton kernels of the fused multi-positive contrastive loss, and their launchers.

Forward: one program per (row tile, column split) walks its column tiles and sums, per row,
``exp2`` of ``s2 = s * log2(e)`` (``log2(e) / tau`` folded into the scale) over the allowed
columns and over each positive set; a finishing kernel merges the splits' partial statistics
and, for ``forward_mean``, reduces the masked means. The rows are unit vectors, so
``s2 <= scale2 = log2(e) / tau``: for tau >= log2(e) / 48 = 0.03006 ("bounded") every exponent
is taken relative to that fixed bound (one exponential per entry, no maxima), for smaller tau,
where such exponents would leave fp32's normal range, relative to running maxima (an online
log-sum-exp). Backward: one program per row tile of ``a`` recomputes ``s = a b^T`` tile by tile
and accumulates ``H b`` in fp32, where ``H`` is the gradient of the losses with respect to
``s`` as seen from the rows (row side), from the columns (column side, the transposed term), or
both (one tower: ``dz = (G + G^T) z / tau`` in one pass, one exponential per entry in the
bounded mode, from the inverse sums the forward stored). Every output element is written by
exactly one program: no atomics on floats, deterministic.

Tiles that are full, group-uniform and off the self diagonal take a fast branch with no masks,
comparing ids as fp32 numbers where every id is exact in fp32 (checked once per program).
Similarity tiles stay in fp32; bf16/fp16 inputs go to the tensor cores as they are, fp32 inputs
through tf32 unless ``set_fp32_precision("ieee")``. Tiles whose row and column groups cannot
meet are not visited. Non-finite inputs give NaN losses and gradients (docs/kernels.md). See
docs/kernels.md for the numerics.
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
# the one used when autotuning is off. Candidates are compiled ahead of time for sm_90
# (benchmarks/kernel_registers.py: triton.compile with a GPUTarget and ptxas -v, no GPU needed);
# the tables keep those that fit Hopper's 227 KiB of shared memory and do not spill registers with
# one key set; a few backward tiles spill a little with two (docs/kernels.md lists them), and
# stay for the autotuner to weigh on the card against those that do not. Which is fastest is for
# the autotuner to find; the 4-warp, 64-row tiles are there because they fit more programs per
# multiprocessor, which a latency-bound loop needs.
_FORWARD_TABLE = {
    128: [(128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (128, 32, 8, 4),
          (64, 128, 8, 3), (64, 32, 4, 3), (64, 32, 4, 4)],
    256: [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
}
# The running-maxima backward: tau < 0.03006, or D > 128.
_BACKWARD_TABLE = {
    128: [(64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3),
          (128, 16, 8, 2)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (64, 16, 8, 2)],
}
# The bounded backward (D <= 128): its similarity tile feeds the second product through plain
# arithmetic, so Triton lays the first product over warps along the rows only ([warps, 1]): a
# 64-row tile on 8 warps would compute it twice, hence 128 rows on 8 warps or 64 on 4 (flash
# attention's layout). Tiles with BLOCK_N = 64 spill here, and at D = 256 every candidate does,
# so D > 128 keeps the running-maxima backward.
_BOUNDED_BACKWARD_TABLE = {
    128: [(64, 32, 4, 3), (128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2), (128, 16, 8, 3), (128, 16, 8, 2)],
}
# (128, 16, 8, 2), last in both backward tables, is there for sm_80 (A100, mma.sync), where it is
# the one tile that spills in neither mode.
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


def backward_tiles(d: int, bounded: bool) -> list[tuple[int, int, int, int]]:
    """The backward's candidate tiles for width ``d`` in its mode, the first being the one used untuned."""
    return (_BOUNDED_BACKWARD_TABLE if bounded else _BACKWARD_TABLE)[_width(d)]


def _backward_configs() -> list[triton.Config]:
    if INTERPRETING:
        return [_config(_INTERPRETER_TILE)]
    tables = (_BACKWARD_TABLE, _BOUNDED_BACKWARD_TABLE)
    return [_config(tile) for tile in dict.fromkeys(t for table in tables for tiles in table.values() for t in tiles)]


def _prune_backward(configs, named_args, **kwargs):
    if INTERPRETING:
        return configs
    tiles = backward_tiles(named_args["D"], kwargs.get("BOUNDED", named_args.get("BOUNDED")))
    wanted = tiles if AUTOTUNE else tiles[:1]
    return [c for c in configs if _tile(c) in wanted]


@triton.jit
def _tile_group_range(groups_ptr, idx, ok):
    g = tl.load(groups_ptr + idx, mask=ok, other=0)
    lo = tl.min(tl.where(ok, g, 9223372036854775807), 0)
    hi = tl.max(tl.where(ok, g, -9223372036854775807), 0)
    return g, lo, hi


@triton.jit
def _wide(x, ok):
    """1 where some ``ok`` value of int64 ``x`` is not exact in fp32 (|x| > 2^24), else 0."""
    return tl.max((ok & ((x < -16777216) | (x > 16777216))).to(tl.int32), 0)


@triton.jit
def _match(row_keys, col_keys):
    """1.0 where a row's key equals a column's, else 0.0, for integer keys exact in fp32:
    saturate(1 - |difference|). Arithmetic, not a predicate per entry: with 2 key sets and 32
    entries a thread, predicates outnumber the predicate registers and get packed into
    general ones and unpacked again, which costs more than the comparison."""
    return tl.clamp(1.0 - tl.abs(row_keys[:, None] - col_keys[None, :]), 0.0, 1.0)


@triton.jit
def _row_attributes(keys_ptr, groups_ptr, idx, ok, P: tl.constexpr):
    """Rows ``idx``: groups and their range, the int64 keys of each set, and 1 where some key
    or group of theirs is not exact in fp32."""
    group, lo, hi = _tile_group_range(groups_ptr, idx, ok)
    key0 = tl.load(keys_ptr + idx * P, mask=ok, other=0)
    wide = tl.maximum(_wide(group, ok), _wide(key0, ok))
    key1 = key0
    if P == 2:
        key1 = tl.load(keys_ptr + idx * P + 1, mask=ok, other=0)
        wide = tl.maximum(wide, _wide(key1, ok))
    return group, lo, hi, key0, key1, wide


@triton.jit
def _low_words(ptr):
    """The int64 array at ``ptr`` seen as int32 pairs: element i's low word is at 2 i."""
    return ptr.to(tl.pointer_type(tl.int32))


@triton.jit
def _tile_is_group(group_words, ok, group32):
    """Whether every column of a tile is in ``group32``, comparing the low words of its groups
    (exact where the program found every group exact in fp32)."""
    g = tl.load(group_words, mask=ok, other=0)
    return tl.max((g != group32).to(tl.int32), 0) == 0


@triton.jit
def _column_scan(
    groups_a_ptr, keys_a_ptr, lo_a, hi_a, groups_b_ptr, keys_b_ptr, lo_b, hi_b, N,
    P: tl.constexpr, BOTH: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """First and one-past-last column tile whose groups meet [lo_a, hi_a] (and, with BOTH,
    whose second group array meets [lo_b, hi_b]), and 1 where some column key or group is not
    exact in fp32 (|id| > 2^24): the check, made once per program, that lets the main loop
    compare the ids' low words, as fp32."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    first = n_tiles
    last = 0
    wide = 0
    for start in range(0, N, _SCAN):
        idx = start + tl.arange(0, _SCAN)
        ok = idx < N
        g = tl.load(groups_a_ptr + idx, mask=ok, other=0)
        tile_lo = tl.min(tl.reshape(tl.where(ok, g, 9223372036854775807), (_SCAN // BLOCK_N, BLOCK_N)), 1)
        tile_hi = tl.max(tl.reshape(tl.where(ok, g, -9223372036854775807), (_SCAN // BLOCK_N, BLOCK_N)), 1)
        hit = (tile_lo <= hi_a) & (lo_a <= tile_hi)
        wide = tl.maximum(wide, _wide(g, ok))
        wide = tl.maximum(wide, _wide(tl.load(keys_a_ptr + idx * P, mask=ok, other=0), ok))
        if P == 2:
            wide = tl.maximum(wide, _wide(tl.load(keys_a_ptr + idx * P + 1, mask=ok, other=0), ok))
        if BOTH:
            g2 = tl.load(groups_b_ptr + idx, mask=ok, other=0)
            lo2 = tl.min(tl.reshape(tl.where(ok, g2, 9223372036854775807), (_SCAN // BLOCK_N, BLOCK_N)), 1)
            hi2 = tl.max(tl.reshape(tl.where(ok, g2, -9223372036854775807), (_SCAN // BLOCK_N, BLOCK_N)), 1)
            hit = hit | ((lo2 <= hi_b) & (lo_b <= hi2))
            wide = tl.maximum(wide, _wide(g2, ok))
            wide = tl.maximum(wide, _wide(tl.load(keys_b_ptr + idx * P, mask=ok, other=0), ok))
            if P == 2:
                wide = tl.maximum(wide, _wide(tl.load(keys_b_ptr + idx * P + 1, mask=ok, other=0), ok))
        tile = start // BLOCK_N + tl.arange(0, _SCAN // BLOCK_N)
        first = tl.minimum(first, tl.min(tl.where(hit, tile, n_tiles), 0))
        last = tl.maximum(last, tl.max(tl.where(hit, tile + 1, 0), 0))
    return first, last, wide


@triton.jit
def _load_rows(ptr, idx, ok, dims, D, EVEN_D: tl.constexpr):
    """Rows ``idx`` of a [*, D] matrix, zero beyond ``ok`` and beyond D. With EVEN_D the mask is
    constant along D, which keeps the loads vectorised."""
    if EVEN_D:
        return tl.load(ptr + idx[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
    else:
        return tl.load(ptr + idx[:, None] * D + dims[None, :], mask=ok[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def _column_keys(key_words, P: tl.constexpr):
    """The low words (int32) of each key set of a column tile whose keys' words start at
    ``key_words`` (set 0's again when P == 1). With two sets the tile's [BLOCK_N, 2] words are
    loaded as one block, which Triton reads coalesced rather than as one load per column and set."""
    if P == 2:
        return tl.split(tl.load(key_words[:, None] + 2 * tl.arange(0, 2)[None, :]))
    else:
        c0 = tl.load(key_words)
        return c0, c0


@triton.jit
def _key_matches(key_words, key0_f, key1_f, P: tl.constexpr):
    """Matches (``_match``) of rows with keys key0_f/key1_f against a column tile (``_column_keys``)."""
    c0, c1 = _column_keys(key_words, P)
    m0 = _match(key0_f, c0.to(tl.float32))
    m1 = m0
    if P == 2:
        m1 = _match(key1_f, c1.to(tl.float32))
    return m0, m1


@triton.jit
def _key_range(keys, ok):
    """The smallest and largest of ``keys`` where ``ok``, as int32 (exact where the fast tiles use it)."""
    lo = tl.min(tl.where(ok, keys, 2147483647), 0).to(tl.int32)
    hi = tl.max(tl.where(ok, keys, -2147483647), 0).to(tl.int32)
    return lo, hi


@triton.jit
def _may_match(col_keys32, lo, hi):
    """Whether some key of a column tile lies in the rows' range [lo, hi]. Where none does, the
    set's matches on the tile are all 0 and the tile skips them: NT-Xent's instance ids, for
    one, meet on few tiles."""
    return (tl.min(col_keys32, 0) <= hi) & (lo <= tl.max(col_keys32, 0))


@triton.jit
def _load_tile(ptrs, ok, dims, D, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile of rows at ``ptrs`` (advanced by the caller each step, which
    spares the per-row address arithmetic), zero beyond ``ok`` (unless EVEN_N: every tile is
    full) and beyond D."""
    if EVEN_N:
        if EVEN_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=(dims < D)[None, :], other=0.0)
    else:
        if EVEN_D:
            return tl.load(ptrs, mask=ok[:, None], other=0.0)
        else:
            return tl.load(ptrs, mask=ok[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def _non_finite(x):
    """Per row, 0 where ``x`` is finite and NaN where it holds a NaN or an inf (both times 0 are
    NaN). Added to a row's sums, it keeps a non-finite input from vanishing behind a mask, a
    maximum or an invalid row."""
    return tl.sum(x.to(tl.float32) * 0.0, 1)


@triton.jit
def _select_code(member0, member1, t0, t1, t2, t3, P: tl.constexpr):
    """Per entry, the table value of its membership code (bit p: positive of key set p)."""
    if P == 1:
        return tl.where(member0, t1, t0)
    else:
        return tl.where(member0, tl.where(member1, t3, t1), tl.where(member1, t2, t0))


@triton.jit
def _accumulate(s2, member0, member1, max_all, sum_all, max0, sum0, max1, sum1, P: tl.constexpr, BOUNDED: tl.constexpr):
    """One tile of (masked) s2 into the row sums: relative to the bound (BOUNDED: one exponential
    and one add per sum) or to running maxima."""
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
    return max_all, sum_all, max0, sum0, max1, sum1


@triton.autotune(
    configs=_forward_configs(),
    key=["M", "N", "D", "P", "BOUNDED"],
    prune_configs_by={"early_config_prune": _prune_forward},
)
@triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})
@triton.jit(do_not_specialize=["self_offset"])  # one compilation for every rank's offset
def _forward_kernel(
    q_ptr, k_ptr, row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr,
    partial_ptr, loss_ptr, valid_ptr, lse_all_ptr, lse_pos_ptr,
    M, N, D, self_offset, scale2,
    P: tl.constexpr, BOUNDED: tl.constexpr, INVERSE: tl.constexpr, STATS: tl.constexpr, CHECK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row0 = pid * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dims = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, rows, row_ok, dims, D, EVEN_D)
    poison = _non_finite(q)
    if CHECK_K:  # k is not q: the first split of the row programs shares out the check of k's rows
        if split == 0:
            for start in range(row0, N, tl.num_programs(0) * BLOCK_M):
                idx = start + tl.arange(0, BLOCK_M)
                poison += tl.sum(_non_finite(_load_rows(k_ptr, idx, idx < N, dims, D, EVEN_D)), 0)
    row_group, rg_lo, rg_hi, key0, key1, rows_wide = _row_attributes(row_keys_ptr, row_groups_ptr, rows, row_ok, P)
    key0_f = key0.to(tl.float32)
    key1_f = key1.to(tl.float32)
    key0_lo, key0_hi = _key_range(key0, row_ok)
    key1_lo, key1_hi = _key_range(key1, row_ok)
    col_keys32_ptr = _low_words(col_keys_ptr)
    col_groups32_ptr = _low_words(col_groups_ptr)

    # BOUNDED: every exponent is taken relative to the bound scale2 of s2 (unit rows), which the
    # maxima then hold throughout; otherwise they are running maxima.
    start = scale2 if BOUNDED else _FLOOR
    max_all = tl.full([BLOCK_M], start, tl.float32)
    sum_all = tl.zeros([BLOCK_M], tl.float32)
    max0 = tl.full([BLOCK_M], start, tl.float32)
    sum0 = tl.zeros([BLOCK_M], tl.float32)
    max1 = tl.full([BLOCK_M], start, tl.float32)
    sum1 = tl.zeros([BLOCK_M], tl.float32)

    first, last, cols_wide = _column_scan(
        col_groups_ptr, col_keys_ptr, rg_lo, rg_hi, col_groups_ptr, col_keys_ptr, rg_lo, rg_hi, N, P, False, BLOCK_N
    )
    # Fast tiles: full, one group, off the self diagonal, every id exact in fp32 (checked once).
    narrow = (rg_lo == rg_hi) & (tl.maximum(rows_wide, cols_wide) == 0)
    per_split = tl.cdiv(last - first, splits)
    t_begin = first + split * per_split
    t_end = tl.minimum(t_begin + per_split, last)
    k_tile = k_ptr + (t_begin * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * D + dims[None, :]
    # Low words of the column tile's groups and keys, advanced with the tile.
    group_words = col_groups32_ptr + 2 * (t_begin * BLOCK_N + tl.arange(0, BLOCK_N))
    key_words = col_keys32_ptr + 2 * P * (t_begin * BLOCK_N + tl.arange(0, BLOCK_N))
    for t in range(t_begin, t_end):
        col0 = t * BLOCK_N
        cols = col0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k = _load_tile(k_tile, col_ok, dims, D, EVEN_D, EVEN_N)
        k_tile += BLOCK_N * D
        if BOUNDED:
            s2 = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2 - scale2
        else:
            s2 = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
        off_diagonal = (col0 + BLOCK_N <= row0 + self_offset) | (row0 + BLOCK_M + self_offset <= col0)
        fast = narrow & (col0 + BLOCK_N <= N) & off_diagonal & _tile_is_group(group_words, col_ok, rg_lo.to(tl.int32))
        if fast:
            if BOUNDED:
                c0, c1 = _column_keys(key_words, P)
                e = tl.exp2(s2)
                sum_all += tl.sum(e, 1)
                if _may_match(c0, key0_lo, key0_hi):
                    sum0 += tl.sum(e * _match(key0_f, c0.to(tl.float32)), 1)
                if P == 2:
                    if _may_match(c1, key1_lo, key1_hi):
                        sum1 += tl.sum(e * _match(key1_f, c1.to(tl.float32)), 1)
            else:
                match0, match1 = _key_matches(key_words, key0_f, key1_f, P)
                max_all, sum_all, max0, sum0, max1, sum1 = _accumulate(
                    s2, match0 > 0.5, match1 > 0.5, max_all, sum_all, max0, sum0, max1, sum1, P, BOUNDED
                )
        else:
            col_group = tl.load(col_groups_ptr + cols, mask=col_ok, other=0)
            allowed = (
                col_ok[None, :]
                & (row_group[:, None] == col_group[None, :])
                & (cols[None, :] != rows[:, None] + self_offset)
            )
            member0 = key0[:, None] == tl.load(col_keys_ptr + cols * P, mask=col_ok, other=0)[None, :]
            member1 = member0
            if P == 2:
                member1 = key1[:, None] == tl.load(col_keys_ptr + cols * P + 1, mask=col_ok, other=0)[None, :]
            max_all, sum_all, max0, sum0, max1, sum1 = _accumulate(
                tl.where(allowed, s2, float("-inf")), member0, member1, max_all, sum_all, max0, sum0, max1, sum1,
                P, BOUNDED,
            )  # fmt: skip
        group_words += 2 * BLOCK_N
        key_words += 2 * P * BLOCK_N

    sum_all += poison
    if splits == 1:
        _finalize_rows(
            rows, row_ok, max_all, sum_all, max0, sum0, max1, sum1, loss_ptr, valid_ptr, lse_all_ptr, lse_pos_ptr,
            P, INVERSE, STATS,
        )  # fmt: skip
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
def _finalize_set(rows, row_ok, lse_all2, bad, sum_all, max_p, sum_p, p: tl.constexpr, loss_ptr, valid_ptr, lse_pos_ptr,
                  P: tl.constexpr, INVERSE: tl.constexpr, STATS: tl.constexpr):  # fmt: skip
    ln2 = 0.6931471805599453
    valid = sum_p > 0
    # log2 of a positive stand-in where a sum is 0, so that no -inf - -inf is ever formed.
    lse2 = tl.where(valid, max_p + tl.log2(tl.where(valid, sum_p, 1.0)), float("-inf"))
    loss = tl.where(valid, (lse_all2 - tl.where(valid, lse2, 0.0)) * ln2, 0.0) + bad
    tl.store(valid_ptr + rows * P + p, valid, mask=row_ok)
    tl.store(loss_ptr + rows * P + p, loss, mask=row_ok)
    if INVERSE:
        tl.store(lse_pos_ptr + rows * STATS + p, tl.where(valid, 1.0 / tl.where(valid, sum_p, 1.0), 0.0), mask=row_ok)
        if STATS == 2 * P:  # the set's share of the denominator's factor: 0 for an invalid set
            share = tl.where(valid, 1.0 / tl.where(valid, sum_all, 1.0), 0.0) + bad
            tl.store(lse_pos_ptr + rows * STATS + P + p, share, mask=row_ok)
    else:
        tl.store(lse_pos_ptr + rows * STATS + p, lse2 * ln2, mask=row_ok)
    return loss, valid


@triton.jit
def _finalize_rows(
    rows, row_ok, max_all, sum_all, max0, sum0, max1, sum1, loss_ptr, valid_ptr, lse_all_ptr, lse_pos_ptr,
    P: tl.constexpr, INVERSE: tl.constexpr, STATS: tl.constexpr,
):  # fmt: skip
    """Writes each row's losses, valid flags and the statistics its backward reads (STATS per
    row beside the one at lse_all_ptr): the LSEs, or with INVERSE (bounded mode) the inverses of
    the sums relative to the bound, 0 for a set without a positive, so that the backward's
    factors take no exponential; with STATS = 2 P also each set's share of the denominator's
    inverse, which spares the backward a validity test per column. Returns the losses and flags
    of both sets (set 0's again when P == 1)."""
    ln2 = 0.6931471805599453
    bad = sum_all * 0.0  # NaN where a non-finite input reached the row
    lse_all2 = tl.where(sum_all > 0, max_all + tl.log2(tl.where(sum_all > 0, sum_all, 1.0)), float("-inf")) + bad
    loss0, valid0 = _finalize_set(
        rows, row_ok, lse_all2, bad, sum_all, max0, sum0, 0, loss_ptr, valid_ptr, lse_pos_ptr, P, INVERSE, STATS
    )
    loss1 = loss0
    valid1 = valid0
    if P == 2:
        loss1, valid1 = _finalize_set(
            rows, row_ok, lse_all2, bad, sum_all, max1, sum1, 1, loss_ptr, valid_ptr, lse_pos_ptr, P, INVERSE, STATS
        )
    if INVERSE:
        any_valid = valid0 | valid1
        tl.store(lse_all_ptr + rows, tl.where(any_valid, 1.0 / tl.where(any_valid, sum_all, 1.0), 0.0) + bad, mask=row_ok)
    else:
        tl.store(lse_all_ptr + rows, lse_all2 * ln2, mask=row_ok)
    return loss0, valid0, loss1, valid1


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
def _segment_sums(base, rows, boundary, loss, valid, p: tl.constexpr, P: tl.constexpr):
    """Stores, for key set p, sum(loss * valid) and sum(valid) over this block's rows of each
    segment (rows below ``boundary``, the others). loss * valid keeps an invalid row's NaN."""
    weighted = loss * valid.to(tl.float32)
    first = rows < boundary
    tl.store(base + p, tl.sum(tl.where(first, weighted, 0.0), 0))
    tl.store(base + P + p, tl.sum(tl.where(first, 0.0, weighted), 0))
    tl.store(base + 2 * P + p, tl.sum(tl.where(first, valid, False).to(tl.float32), 0))
    tl.store(base + 3 * P + p, tl.sum(tl.where(first, False, valid).to(tl.float32), 0))


@triton.jit
def _finish_kernel(
    partial_ptr, loss_ptr, valid_ptr, lse_all_ptr, lse_pos_ptr, block_sums_ptr, ticket_ptr, out_ptr,
    M, splits, boundary,
    P: tl.constexpr, INVERSE: tl.constexpr, STATS: tl.constexpr, MERGE: tl.constexpr, MEANS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per block of rows. MERGE: merges the column splits' partial statistics and
    finalises the rows. MEANS: the masked means of the losses over each segment of rows and
    each key set, out [2, 2, P] = (means, valid counts) by (segment, set). Each block stores its
    sums; the last block to arrive (an int32 ticket) adds them in block order, so the means do
    not depend on the order the blocks ran in, and resets the ticket for the next launch."""
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    if MERGE:
        max_all, sum_all = _merge(partial_ptr, 0, splits, rows, row_ok, M, 2 + 2 * P, BLOCK)
        max0, sum0 = _merge(partial_ptr, 2, splits, rows, row_ok, M, 2 + 2 * P, BLOCK)
        max1 = max0
        sum1 = sum0
        if P == 2:
            max1, sum1 = _merge(partial_ptr, 4, splits, rows, row_ok, M, 2 + 2 * P, BLOCK)
        loss0, valid0, loss1, valid1 = _finalize_rows(
            rows, row_ok, max_all, sum_all, max0, sum0, max1, sum1, loss_ptr, valid_ptr, lse_all_ptr, lse_pos_ptr,
            P, INVERSE, STATS,
        )  # fmt: skip
    else:
        loss0 = tl.load(loss_ptr + rows * P, mask=row_ok, other=0.0)
        valid0 = tl.load(valid_ptr + rows * P, mask=row_ok, other=0) != 0
        loss1 = loss0
        valid1 = valid0
        if P == 2:
            loss1 = tl.load(loss_ptr + rows * P + 1, mask=row_ok, other=0.0)
            valid1 = tl.load(valid_ptr + rows * P + 1, mask=row_ok, other=0) != 0
    if MEANS:
        width: tl.constexpr = 4 * P
        base = block_sums_ptr + pid * width
        _segment_sums(base, rows, boundary, loss0, valid0 & row_ok, 0, P)
        if P == 2:
            _segment_sums(base, rows, boundary, loss1, valid1 & row_ok, 1, P)
        tl.debug_barrier()  # every thread's sums are stored before the ticket is taken
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            lanes = tl.arange(0, 2 * P)
            sums = tl.zeros([2 * P], tl.float32)
            counts = tl.zeros([2 * P], tl.float32)
            for block in range(0, tl.num_programs(0)):
                sums += tl.load(block_sums_ptr + block * width + lanes)
                counts += tl.load(block_sums_ptr + block * width + 2 * P + lanes)
            tl.store(out_ptr + lanes, sums / tl.maximum(counts, 1.0))
            tl.store(out_ptr + 2 * P + lanes, counts)
            tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _upstream(grad_ptr, idx, ok, boundary, c0, c1, p: tl.constexpr, P: tl.constexpr, MEAN: tl.constexpr):
    """Upstream gradient of row ``idx``'s loss of set p: per row from grad_ptr, or with MEAN the
    mean's gradient over the segment's valid count, c0 below ``boundary`` and c1 from it on
    (MEAN == 1: one segment, c0 throughout). The caller zeroes invalid rows."""
    if MEAN == 1:
        return c0
    elif MEAN == 2:
        return tl.where(idx < boundary, c0, c1)
    else:
        return tl.load(grad_ptr + idx * P + p, mask=ok, other=0.0)


@triton.jit
def _gradient_tables(
    grad_ptr, lse_all_ptr, lse_pos_ptr, idx, ok, boundary, c00, c01, c10, c11, P: tl.constexpr, MEAN: tl.constexpr
):  # fmt: skip
    """Per row ``idx`` of q and membership code c: the exponent offset (log2 units) and
    coefficient with dL/ds_ij = coef_c(i) * exp2(s2_ij - offset_c(i)); returns the offsets of
    codes 0..3, then their coefficients (codes 2 and 3 repeat 0 when P == 1). Rows that are not
    ``ok`` or receive no gradient get offset _DEAD and coefficient 0."""
    log2e = 1.4426950408889634
    lse_all = tl.load(lse_all_ptr + idx, mask=ok, other=0.0) * log2e
    lse0 = tl.load(lse_pos_ptr + idx * P, mask=ok, other=float("-inf"))
    valid0 = lse0 > float("-inf")
    lse0 = tl.where(valid0, lse0 * log2e, 0.0)
    g0 = tl.where(valid0, _upstream(grad_ptr, idx, ok, boundary, c00, c10, 0, P, MEAN), 0.0)
    if P == 1:
        o0 = tl.where(valid0, lse_all, _DEAD)
        o1 = tl.where(valid0, lse0, _DEAD)
        c1 = tl.where(valid0, g0 * (tl.exp2(lse0 - lse_all) - 1.0), 0.0)
        return o0, o1, o0, o0, g0, c1, g0, g0
    else:
        lse1 = tl.load(lse_pos_ptr + idx * P + 1, mask=ok, other=float("-inf"))
        valid1 = lse1 > float("-inf")
        lse1 = tl.where(valid1, lse1 * log2e, 0.0)
        g1 = tl.where(valid1, _upstream(grad_ptr, idx, ok, boundary, c01, c11, 1, P, MEAN), 0.0)
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
def _bounded_factors(
    grad_ptr, inv_all_ptr, inv_pos_ptr, idx, ok, boundary, c00, c01, c10, c11, P: tl.constexpr, MEAN: tl.constexpr,
    STATS: tl.constexpr,
):  # fmt: skip
    """Per row ``idx`` of q, with every exponent taken relative to the bound scale2:
    dL/ds_ij = exp2(s2_ij - scale2) * (all_i - [j in set 0] pos0_i - [j in set 1] pos1_i), where
    all = (g0 + g1) / sum_all and pos_p = g_p / sum_p, the sums relative to the bound. The
    forward stored their inverses (0 for a set without a positive, which then takes no gradient),
    so no exponential is needed here; with STATS = 2 P it also stored each set's share of
    1 / sum_all, which needs no validity test."""
    if STATS == 2 * P:
        u0 = _upstream(grad_ptr, idx, ok, boundary, c00, c10, 0, P, MEAN)
        all_ = u0 * tl.load(inv_pos_ptr + idx * STATS + P, mask=ok, other=0.0)
        pos0 = u0 * tl.load(inv_pos_ptr + idx * STATS, mask=ok, other=0.0)
        pos1 = pos0
        if P == 2:
            u1 = _upstream(grad_ptr, idx, ok, boundary, c01, c11, 1, P, MEAN)
            all_ += u1 * tl.load(inv_pos_ptr + idx * STATS + P + 1, mask=ok, other=0.0)
            pos1 = u1 * tl.load(inv_pos_ptr + idx * STATS + 1, mask=ok, other=0.0)
        return all_, pos0, pos1
    inv0 = tl.load(inv_pos_ptr + idx * P, mask=ok, other=0.0)
    g0 = tl.where(inv0 > 0, _upstream(grad_ptr, idx, ok, boundary, c00, c10, 0, P, MEAN), 0.0)
    g_sum = g0
    pos0 = g0 * inv0
    pos1 = pos0
    if P == 2:
        inv1 = tl.load(inv_pos_ptr + idx * P + 1, mask=ok, other=0.0)
        g1 = tl.where(inv1 > 0, _upstream(grad_ptr, idx, ok, boundary, c01, c11, 1, P, MEAN), 0.0)
        g_sum += g1
        pos1 = g1 * inv1
    return g_sum * tl.load(inv_all_ptr + idx, mask=ok, other=0.0), pos0, pos1


@triton.jit
def _bounded_weight(member0, member1, all_, pos0, pos1, P: tl.constexpr):
    w = all_ - tl.where(member0, pos0, 0.0)
    if P == 2:
        w -= tl.where(member1, pos1, 0.0)
    return w


@triton.jit
def _bounded_side(key_words, key0_f, key1_f, lo0, hi0, lo1, hi1, all_, pos0, pos1, P: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One side's bounded weight on a fast tile, ``all - [same key 0] pos0 - [same key 1] pos1``
    (the factors broadcast to the tile), matching this program's row keys key0_f/key1_f (range
    [lo, hi] per set) against the tile's (at ``key_words``), a key set's term only where its keys
    can meet (``_may_match``)."""
    k0, k1 = _column_keys(key_words, P)
    w = tl.broadcast_to(all_, (BLOCK_M, BLOCK_N))
    if _may_match(k0, lo0, hi0):
        w -= _match(key0_f, k0.to(tl.float32)) * pos0
    if P == 2:
        if _may_match(k1, lo1, hi1):
            w -= _match(key1_f, k1.to(tl.float32)) * pos1
    return w


@triton.jit
def _mean_coefficients(gmean0_ptr, gmean1_ptr, out_ptr, P: tl.constexpr, HAS: tl.constexpr):
    """d mean / d loss of a valid row, per (segment, set): the mean's upstream gradient (0 for a
    mean that received none, bit s of HAS clear) over the segment's valid count."""
    c00 = 0.0
    c01 = 0.0
    c10 = 0.0
    c11 = 0.0
    if HAS & 1:
        c00 = tl.load(gmean0_ptr) / tl.maximum(tl.load(out_ptr + 2 * P), 1.0)
        if P == 2:
            c01 = tl.load(gmean0_ptr + 1) / tl.maximum(tl.load(out_ptr + 2 * P + 1), 1.0)
    if HAS & 2:
        c10 = tl.load(gmean1_ptr) / tl.maximum(tl.load(out_ptr + 3 * P), 1.0)
        if P == 2:
            c11 = tl.load(gmean1_ptr + 1) / tl.maximum(tl.load(out_ptr + 3 * P + 1), 1.0)
    return c00, c01, c10, c11


@triton.jit
def _weight(s2, member0, member1, f0, f1, f2, f3, c0, c1, c2, c3, P: tl.constexpr, BOUNDED: tl.constexpr):
    """dL/ds of one side per entry, from the side's per-row numbers broadcast to the tile:
    BOUNDED, (all, pos0, pos1) in f0..f2, to be multiplied by the shared exponential; otherwise
    offsets f0..f3 and coefficients c0..c3 per membership code, with the side's own exponential."""
    if BOUNDED:
        return _bounded_weight(member0, member1, f0, f1, f2, P)
    else:
        offset = _select_code(member0, member1, f0, f1, f2, f3, P)
        coef = _select_code(member0, member1, c0, c1, c2, c3, P)
        return coef * tl.exp2(s2 - offset)


@triton.jit
def _store_gradient(out_ptr, rows, row_ok, dims, D, value, EVEN_D: tl.constexpr):
    out = value.to(out_ptr.dtype.element_ty)
    if EVEN_D:
        tl.store(out_ptr + rows[:, None] * D + dims[None, :], out, mask=row_ok[:, None])
    else:
        tl.store(out_ptr + rows[:, None] * D + dims[None, :], out, mask=row_ok[:, None] & (dims < D)[None, :])


@triton.autotune(
    configs=_backward_configs(),
    key=["M", "N", "D", "P", "BOUNDED", "MEAN", "TWO_SIDES"],
    prune_configs_by={"early_config_prune": _prune_backward},
)
@triton.heuristics({"EVEN_N": lambda args: args["M"] % args["BLOCK_N"] == 0 and args["N"] % args["BLOCK_N"] == 0})
@triton.jit(do_not_specialize=["self_offset", "boundary"])
def _backward_kernel(
    q_ptr, k_ptr, dq_ptr, dk_ptr, partial_ptr, tickets_ptr, grad_ptr, gmean0_ptr, gmean1_ptr, means_ptr,
    lse_all_ptr, lse_pos_ptr, row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr,
    M, N, D, self_offset, boundary, scale2, inv_tau,
    P: tl.constexpr, TWO_SIDES: tl.constexpr, SYMMETRIC: tl.constexpr,
    BOUNDED: tl.constexpr, STATS: tl.constexpr, MEAN: tl.constexpr, HAS: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """dq and dk in one launch. One tower (not TWO_SIDES): each program takes a row tile of q
    through both sides, dq = (G + G^T) q / tau. Two towers: the first programs take q's row
    tiles (row side, dq = G k / tau), the others k's (column side, dk = G^T q / tau). Column
    splits (grid axis 1) walk shares of the column tiles; each stores its fp32 partial sum, and
    the last split of a row tile to arrive (an int32 ticket per row tile) adds them in split
    order, so the result does not depend on the order the splits ran in, and resets its ticket
    for the next launch. Every output element is written by one program: deterministic."""
    pid = tl.program_id(0)
    q_tiles = tl.cdiv(M, BLOCK_M)
    if not TWO_SIDES:
        _backward_tile(
            pid, q_ptr, k_ptr, dq_ptr, partial_ptr, tickets_ptr + pid, grad_ptr, gmean0_ptr, gmean1_ptr, means_ptr,
            lse_all_ptr, lse_pos_ptr, row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr,
            M, M, D, self_offset, boundary, scale2, inv_tau, P, True, True, SYMMETRIC,
            BOUNDED, STATS, MEAN, HAS, BLOCK_D, EVEN_D, PRECISION, BLOCK_M, BLOCK_N, EVEN_N,
        )  # fmt: skip
    elif pid < q_tiles:
        _backward_tile(
            pid, q_ptr, k_ptr, dq_ptr, partial_ptr, tickets_ptr + pid, grad_ptr, gmean0_ptr, gmean1_ptr, means_ptr,
            lse_all_ptr, lse_pos_ptr, row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr,
            M, N, D, self_offset, boundary, scale2, inv_tau, P, True, False, False,
            BOUNDED, STATS, MEAN, HAS, BLOCK_D, EVEN_D, PRECISION, BLOCK_M, BLOCK_N, EVEN_N,
        )  # fmt: skip
    else:  # k's partial sums after q's
        _backward_tile(
            pid - q_tiles, k_ptr, q_ptr, dk_ptr, partial_ptr + tl.num_programs(1) * M * BLOCK_D, tickets_ptr + pid,
            grad_ptr, gmean0_ptr, gmean1_ptr, means_ptr, lse_all_ptr, lse_pos_ptr,
            row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr,
            N, M, D, self_offset, boundary, scale2, inv_tau, P, False, True, False,
            BOUNDED, STATS, MEAN, HAS, BLOCK_D, EVEN_D, PRECISION, BLOCK_M, BLOCK_N, EVEN_N,
        )  # fmt: skip


@triton.jit
def _backward_tile(
    pid, a_ptr, b_ptr, out_ptr, partial_ptr, ticket_ptr, grad_ptr, gmean0_ptr, gmean1_ptr, means_ptr, lse_all_ptr,
    lse_pos_ptr, row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr,
    A_COUNT, B_COUNT, D, self_offset, boundary, scale2, inv_tau,
    P: tl.constexpr, ROW_SIDE: tl.constexpr, COL_SIDE: tl.constexpr, SYMMETRIC: tl.constexpr,
    BOUNDED: tl.constexpr, STATS: tl.constexpr, MEAN: tl.constexpr, HAS: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """Row tile ``pid`` of d a = (1/tau) sum_b H_ab b_b. Row side: a are rows of q (keys
    row_keys), b are columns of k. Column side: a are columns of k, b are rows of q (the
    transposed term). The upstream gradient is per row (grad_ptr, MEAN = 0) or, with MEAN = 1 or
    2 segments, that of the masked means (gmean0/gmean1 per segment, means_ptr holding the
    forward's (means, counts)). SYMMETRIC (one tower, row and column keys and groups the same
    arrays): both sides' memberships are one match per entry. This split's share of the column
    tiles goes to ``out_ptr``, or to ``partial_ptr`` for the last split to add (see
    ``_backward_kernel``)."""
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row0 = pid * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < A_COUNT
    dims = tl.arange(0, BLOCK_D)
    a = _load_rows(a_ptr, rows, row_ok, dims, D, EVEN_D)
    poison = _non_finite(a)  # a non-finite row of a gets a NaN gradient row even where no loss reaches it
    c00, c01, c10, c11 = _mean_coefficients(gmean0_ptr, gmean1_ptr, means_ptr, P, HAS)

    # Row side: this program's rows as rows of q; column side: as columns of k.
    r_group, r_lo, r_hi, r_key0, r_key1, r_wide = _row_attributes(row_keys_ptr, row_groups_ptr, rows, row_ok & ROW_SIDE, P)
    c_group, c_lo, c_hi, c_key0, c_key1, c_wide = _row_attributes(col_keys_ptr, col_groups_ptr, rows, row_ok & COL_SIDE, P)
    if BOUNDED:
        r0, r1, r2 = _bounded_factors(
            grad_ptr, lse_all_ptr, lse_pos_ptr, rows, row_ok & ROW_SIDE, boundary, c00, c01, c10, c11, P, MEAN, STATS
        )
        r3 = r0
        rc0 = r0
        rc1 = r0
        rc2 = r0
        rc3 = r0
    else:
        r0, r1, r2, r3, rc0, rc1, rc2, rc3 = _gradient_tables(
            grad_ptr, lse_all_ptr, lse_pos_ptr, rows, row_ok & ROW_SIDE, boundary, c00, c01, c10, c11, P, MEAN
        )
    if ROW_SIDE:
        first, last, wide = _column_scan(
            col_groups_ptr, col_keys_ptr, r_lo, r_hi, row_groups_ptr, row_keys_ptr, c_lo, c_hi, B_COUNT,
            P, COL_SIDE and not SYMMETRIC, BLOCK_N,
        )  # fmt: skip
    else:
        first, last, wide = _column_scan(
            row_groups_ptr, row_keys_ptr, c_lo, c_hi, row_groups_ptr, row_keys_ptr, c_lo, c_hi, B_COUNT,
            P, False, BLOCK_N,
        )  # fmt: skip
    # Fast tiles: full, one group on each side, off the self diagonal, ids within int32.
    narrow = (tl.maximum(tl.maximum(r_wide, c_wide), wide) == 0) & ((r_lo == r_hi) | (not ROW_SIDE))
    narrow = narrow & ((c_lo == c_hi) | (not COL_SIDE))
    r_key0_f = r_key0.to(tl.float32)
    r_key1_f = r_key1.to(tl.float32)
    key0_lo, key0_hi = _key_range(r_key0, row_ok)
    key1_lo, key1_hi = _key_range(r_key1, row_ok)
    c_key0_lo, c_key0_hi = _key_range(c_key0, row_ok)
    c_key1_lo, c_key1_hi = _key_range(c_key1, row_ok)
    c_key0_f = c_key0.to(tl.float32)
    c_key1_f = c_key1.to(tl.float32)
    per_split = tl.cdiv(last - first, splits)
    t_begin = first + split * per_split
    t_end = tl.minimum(t_begin + per_split, last)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(t_begin, t_end):
        col0 = t * BLOCK_N
        cols = col0 + tl.arange(0, BLOCK_N)
        col_ok = cols < B_COUNT
        # Addresses from a scalar base each step: loop-carried pointer tiles would hold registers
        # this kernel needs.
        b = _load_tile(b_ptr + col0 * D + tl.arange(0, BLOCK_N)[:, None] * D + dims[None, :], col_ok, dims, D, EVEN_D, EVEN_N)
        col_key_words = _low_words(col_keys_ptr) + 2 * P * cols
        row_key_words = _low_words(row_keys_ptr) + 2 * P * cols
        col_group_words = _low_words(col_groups_ptr) + 2 * cols
        row_group_words = _low_words(row_groups_ptr) + 2 * cols
        s2 = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        if COL_SIDE:  # the columns' numbers, as rows of q
            if BOUNDED:
                q0, q1, q2 = _bounded_factors(
                    grad_ptr, lse_all_ptr, lse_pos_ptr, cols, col_ok, boundary, c00, c01, c10, c11, P, MEAN, STATS
                )
                q3 = q0
                qc0 = q0
                qc1 = q0
                qc2 = q0
                qc3 = q0
            else:
                q0, q1, q2, q3, qc0, qc1, qc2, qc3 = _gradient_tables(
                    grad_ptr, lse_all_ptr, lse_pos_ptr, cols, col_ok, boundary, c00, c01, c10, c11, P, MEAN
                )
        fast = narrow & (col0 + BLOCK_N <= B_COUNT)
        if ROW_SIDE:
            fast = fast & ((col0 + BLOCK_N <= row0 + self_offset) | (row0 + BLOCK_M + self_offset <= col0))
            fast = fast & _tile_is_group(col_group_words, col_ok, r_lo.to(tl.int32))
        if COL_SIDE:
            fast = fast & ((row0 + BLOCK_M <= col0 + self_offset) | (col0 + BLOCK_N + self_offset <= row0))
            if not SYMMETRIC:
                fast = fast & _tile_is_group(row_group_words, col_ok, c_lo.to(tl.int32))
        if fast:
            h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if BOUNDED and SYMMETRIC:
                # one match per key set serves both sides: the factors add,
                # all_i + all_j - [same key 0] (pos0_i + pos0_j) - [same key 1] (pos1_i + pos1_j)
                h = _bounded_side(
                    col_key_words, r_key0_f, r_key1_f, key0_lo, key0_hi, key1_lo, key1_hi,
                    r0[:, None] + q0[None, :], r1[:, None] + q1[None, :], r2[:, None] + q2[None, :], P, BLOCK_M, BLOCK_N,
                )  # fmt: skip
            elif BOUNDED:  # each side on its own keys: all - [same key 0] pos0 - [same key 1] pos1
                if ROW_SIDE:
                    h += _bounded_side(
                        col_key_words, r_key0_f, r_key1_f, key0_lo, key0_hi, key1_lo, key1_hi,
                        r0[:, None], r1[:, None], r2[:, None], P, BLOCK_M, BLOCK_N,
                    )  # fmt: skip
                if COL_SIDE:
                    h += _bounded_side(
                        row_key_words, c_key0_f, c_key1_f, c_key0_lo, c_key0_hi, c_key1_lo, c_key1_hi,
                        q0[None, :], q1[None, :], q2[None, :], P, BLOCK_M, BLOCK_N,
                    )  # fmt: skip
            else:
                if ROW_SIDE:
                    rm0, rm1 = _key_matches(col_key_words, r_key0_f, r_key1_f, P)
                if COL_SIDE:
                    if SYMMETRIC:
                        cm0 = rm0
                        cm1 = rm1
                    else:
                        cm0, cm1 = _key_matches(row_key_words, c_key0_f, c_key1_f, P)
                if ROW_SIDE:
                    h += _weight(
                        s2, rm0 > 0.5, rm1 > 0.5, r0[:, None], r1[:, None], r2[:, None], r3[:, None],
                        rc0[:, None], rc1[:, None], rc2[:, None], rc3[:, None], P, BOUNDED,
                    )  # fmt: skip
                if COL_SIDE:
                    h += _weight(
                        s2, cm0 > 0.5, cm1 > 0.5, q0[None, :], q1[None, :], q2[None, :], q3[None, :],
                        qc0[None, :], qc1[None, :], qc2[None, :], qc3[None, :], P, BOUNDED,
                    )  # fmt: skip
        else:
            h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if ROW_SIDE:
                b_group = tl.load(col_groups_ptr + cols, mask=col_ok, other=0)
                allowed = (
                    col_ok[None, :]
                    & (r_group[:, None] == b_group[None, :])
                    & (cols[None, :] != rows[:, None] + self_offset)
                )
                member0 = r_key0[:, None] == tl.load(col_keys_ptr + cols * P, mask=col_ok, other=0)[None, :]
                member1 = member0
                if P == 2:
                    member1 = r_key1[:, None] == tl.load(col_keys_ptr + cols * P + 1, mask=col_ok, other=0)[None, :]
                g = _weight(
                    s2, member0, member1, r0[:, None], r1[:, None], r2[:, None], r3[:, None],
                    rc0[:, None], rc1[:, None], rc2[:, None], rc3[:, None], P, BOUNDED,
                )  # fmt: skip
                h += tl.where(allowed, g, 0.0)
            if COL_SIDE:
                b_group = tl.load(row_groups_ptr + cols, mask=col_ok, other=0)
                allowed = (
                    col_ok[None, :]
                    & (c_group[:, None] == b_group[None, :])
                    & (rows[:, None] != cols[None, :] + self_offset)
                )
                member0 = c_key0[:, None] == tl.load(row_keys_ptr + cols * P, mask=col_ok, other=0)[None, :]
                member1 = member0
                if P == 2:
                    member1 = c_key1[:, None] == tl.load(row_keys_ptr + cols * P + 1, mask=col_ok, other=0)[None, :]
                g = _weight(
                    s2, member0, member1, q0[None, :], q1[None, :], q2[None, :], q3[None, :],
                    qc0[None, :], qc1[None, :], qc2[None, :], qc3[None, :], P, BOUNDED,
                )  # fmt: skip
                h += tl.where(allowed, g, 0.0)
        if BOUNDED:
            # One exponential per entry serves both sides: their offsets are all scale2.
            h *= tl.exp2(s2 - scale2)
        acc += tl.dot(h.to(b.dtype), b, input_precision=PRECISION)
    if splits == 1:
        _store_gradient(out_ptr, rows, row_ok, dims, D, acc * inv_tau + poison[:, None], EVEN_D)
    else:
        partial = partial_ptr + rows[:, None] * BLOCK_D + dims[None, :]
        tl.store(partial + split * A_COUNT * BLOCK_D, acc, mask=row_ok[:, None])
        tl.debug_barrier()  # every thread's share is stored before the ticket is taken
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == splits - 1:
            total = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for s in range(0, splits):
                total += tl.load(partial + s * A_COUNT * BLOCK_D, mask=row_ok[:, None], other=0.0)
            _store_gradient(out_ptr, rows, row_ok, dims, D, total * inv_tau + poison[:, None], EVEN_D)
            tl.atomic_xchg(ticket_ptr, 0)




# ---------------------------------------------------------------------------------------------
# Launchers.


def last_configs() -> list[str]:
    """The tile (BLOCK_M, BLOCK_N, warps, stages) each kernel ran with last, for benchmark notes."""
    notes = []
    for name, kernel in (("forward", _forward_kernel), ("backward", _backward_kernel)):
        config = getattr(kernel, "best_config", None)
        if config is not None:
            notes.append(f"{name} tile {_tile(config)}")
    return notes


def _bounded(tau: float) -> bool:
    """Whether exponents may be taken relative to the fixed bound log2(e) / tau of s2 (unit
    rows) instead of running maxima: they then span at most 2 * 1.01 * log2(e) / tau, which must
    stay clear of fp32's smallest normal exponent (-126) for the sums to keep full precision."""
    return _LOG2E / tau <= _BOUNDED_SCALE2


def bounded_backward(tau: float, d: int) -> bool:
    """Whether the backward takes exponents relative to the bound (it has tiles for D <= 128)."""
    return _bounded(tau) and _width(d) in _BOUNDED_BACKWARD_TABLE


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return _fp32_precision if dtype == torch.float32 else "tf32"


def _forward_splits(m: int, n: int, sms: int) -> int:
    """Column splits that bring the forward grid to about four 128-row programs per
    multiprocessor, each split keeping at least 1,024 columns: several waves of programs keep
    the last one's idle share small whatever the autotuned tile fits per multiprocessor. No
    multiprocessors (``sms`` 0): not a GPU, one split."""
    if sms == 0:
        return 1
    row_tiles = triton.cdiv(m, 128)
    return max(1, min(triton.cdiv(4 * sms, row_tiles), n // 1024, 8))


def _backward_splits(rows: int, cols: int, sms: int, block_m: int) -> int:
    """Column splits that bring the backward's row tiles (``rows`` in all, both sides of a
    two-tower launch) to about two programs per multiprocessor: one full wave of 4-warp programs
    or two of 8-warp ones (about 250 registers a thread: two or one fit), each split keeping at
    least _SPLIT_COLUMNS columns so that its fixed costs stay small beside its loop. No
    multiprocessors (``sms`` 0): not a GPU, one split."""
    if sms == 0:
        return 1
    return max(1, min(2 * sms // triton.cdiv(rows, block_m), cols // _SPLIT_COLUMNS, _MAX_BACKWARD_SPLITS))


def _multiprocessors(device: torch.device) -> int:
    """The device's multiprocessors, 0 where it is not a GPU."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


_MAX_BACKWARD_SPLITS = 8
_SPLIT_COLUMNS = 512
_FINISH_BLOCK = 1024  # rows per program of the finishing kernel


class _Plan:
    """What a launch needs that depends only on shapes, dtype, device, tau and layout, made once
    per such combination: grids, compile-time constants, and scratch buffers that live only
    within one kernel or between the forward kernel and the finishing one of the same call
    (stream order keeps one call's use of them before the next call's: calls of one shape on two
    streams at once would share them). A step then spends its host time on launches.
    ``splits`` overrides the column splits of both directions."""

    def __init__(self, m, n, d, p, dtype, device, tau, one_tower, splits):
        f32 = dict(device=device, dtype=torch.float32)
        sms = _multiprocessors(device)
        self.splits = splits or _forward_splits(m, n, sms)
        self.bounded_backward = bounded_backward(tau, d)
        self.scale2, self.inv_tau = _LOG2E / tau, 1.0 / tau
        common = dict(P=p, BLOCK_D=_block_d(d), EVEN_D=_block_d(d) == d, PRECISION=_precision(dtype))
        self.forward_constants = dict(
            **common, BOUNDED=_bounded(tau), INVERSE=self.bounded_backward, CHECK_K=not one_tower
        )
        self.backward_constants = dict(**common, BOUNDED=self.bounded_backward)
        # Statistics per row of the masked-means path: in the bounded backward, each set's
        # share of the denominator's inverse as well (no validity test per column).
        self.mean_stats = 2 * p if self.bounded_backward else p
        self.backward_variants: dict[tuple, dict] = {}
        self.finish = dict(P=p, INVERSE=self.bounded_backward, BLOCK=_FINISH_BLOCK)
        self.forward_grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), self.splits)
        self.finish_grid = (triton.cdiv(m, _FINISH_BLOCK),)
        # The backward: q's row tiles, then (two towers) k's, by column splits; the partial sums
        # are sized for the candidate tile that splits most.
        backward_rows = m if one_tower else m + n

        def split_count(block_m):
            return splits or _backward_splits(backward_rows, min(m, n), sms, block_m)

        self.backward_grid = lambda meta: (
            triton.cdiv(m, meta["BLOCK_M"]) + (0 if one_tower else triton.cdiv(n, meta["BLOCK_M"])),
            split_count(meta["BLOCK_M"]),
        )
        candidates = [_INTERPRETER_TILE] if INTERPRETING else backward_tiles(d, self.bounded_backward)
        most = max(split_count(tile[0]) for tile in candidates)
        if most * backward_rows * _block_d(d) >= 2**31:  # the kernel's int32 offsets into the partial sums
            raise ValueError(f"{most} column splits of {backward_rows} rows exceed the backward's int32 offsets")
        self.backward_partial = torch.empty(most * backward_rows * _block_d(d) if most > 1 else 1, **f32)
        self.backward_tickets = torch.zeros(backward_rows, device=device, dtype=torch.int32)
        self.partial = torch.empty((self.splits, 2 + 2 * p, m), **f32) if self.splits > 1 else torch.empty(1, **f32)
        self.loss = torch.empty((m, p), **f32)
        self.valid = torch.empty((m, p), device=device, dtype=torch.bool)
        self.block_sums = torch.empty((self.finish_grid[0], 4 * p), **f32)
        self.ticket = torch.zeros(1, device=device, dtype=torch.int32)


_PLANS: dict[tuple, _Plan] = {}


def _plan(q: torch.Tensor, n: int, p: int, tau: float, one_tower: bool, splits: int | None = None) -> _Plan:
    m, d = q.shape
    key = (m, n, d, p, q.dtype, q.device, tau, one_tower, splits, _fp32_precision)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(m, n, d, p, q.dtype, q.device, tau, one_tower, splits)
    return plan


def _launch_forward(plan, q, k, keys, loss, valid, lse_all, lse_pos, stats, self_offset) -> None:
    m, d = q.shape
    _forward_kernel[plan.forward_grid](
        q, k, *keys, plan.partial, loss, valid, lse_all, lse_pos, m, k.shape[0], d, self_offset, plan.scale2,
        STATS=stats, **plan.forward_constants,
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
    lse_all = torch.empty((m,), device=q.device, dtype=torch.float32)
    lse_pos = torch.empty((m, p), device=q.device, dtype=torch.float32)
    keys = (row_keys, col_keys, row_groups, col_groups)
    _launch_forward(plan, q, k, keys, loss, valid, lse_all, lse_pos, p, self_offset)
    if plan.splits > 1:
        _finish_kernel[plan.finish_grid](
            plan.partial, loss, valid, lse_all, lse_pos, plan.block_sums, plan.ticket, lse_all, m, plan.splits, m,
            STATS=p, MERGE=True, MEANS=False, **plan.finish,
        )  # fmt: skip
    return loss, valid, lse_all, lse_pos


def forward_mean(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower, boundary, *, splits=None):
    """The masked means of the losses over rows [0, boundary) and [boundary, M), per key set,
    in two launches. Returns (means [2 P], by segment then set; state): the state is what
    ``backward_mean`` takes back, one buffer holding the statistics ``forward`` would return and
    (means, valid counts) by (segment, set), and the launch plan."""
    q = q.contiguous()
    k = q if one_tower else k.contiguous()
    m, p = q.shape[0], row_keys.shape[1]
    plan = _plan(q, k.shape[0], p, tau, one_tower, splits)
    stats = plan.mean_stats
    buffer = torch.empty(m * (1 + stats) + 4 * p, device=q.device, dtype=torch.float32)
    stats_pos, out = buffer[m:], buffer[m * (1 + stats) :]
    keys = (row_keys, col_keys, row_groups, col_groups)
    _launch_forward(plan, q, k, keys, plan.loss, plan.valid, buffer, stats_pos, stats, self_offset)
    _finish_kernel[plan.finish_grid](
        plan.partial, plan.loss, plan.valid, buffer, stats_pos, plan.block_sums, plan.ticket, out, m, plan.splits,
        boundary, STATS=stats, MERGE=plan.splits > 1, MEANS=True, **plan.finish,
    )  # fmt: skip
    return out[: 2 * p], (buffer, plan)


def _launch_backward(plan, upstream, q, k, keys, lse_all, lse_pos, stats, self_offset, boundary, one_tower, mean):
    """(dq, dk), dk None with one tower: one launch."""
    m, d = q.shape
    symmetric = one_tower and keys[0] is keys[1] and keys[2] is keys[3]
    constants = plan.backward_variants.get((mean, symmetric, stats))
    if constants is None:
        constants = plan.backward_variants[(mean, symmetric, stats)] = dict(
            MEAN=mean[0], HAS=mean[1], SYMMETRIC=symmetric, STATS=stats, TWO_SIDES=not one_tower,
            **plan.backward_constants,
        )  # fmt: skip
    dq = torch.empty_like(q)
    dk = None if one_tower else torch.empty_like(k)
    _backward_kernel[plan.backward_grid](
        q, k, dq, dq if one_tower else dk, plan.backward_partial, plan.backward_tickets, *upstream, lse_all, lse_pos,
        *keys, m, k.shape[0], d, self_offset, boundary, plan.scale2, plan.inv_tau, **constants,
    )  # fmt: skip
    return dq, dk


def backward(
    grad_loss, q, k, row_keys, col_keys, row_groups, col_groups, lse_all, lse_pos, self_offset, tau, one_tower,
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
        plan, upstream, q, k, keys, lse_all, lse_pos, lse_pos.shape[1], self_offset, q.shape[0], one_tower, (0, 0)
    )
    return dq, q.new_empty((0, q.shape[1])) if dk is None else dk


def backward_mean(grad_means, state, q, k, row_keys, col_keys, row_groups, col_groups, self_offset, one_tower, boundary):
    """(dq, dk or None with one tower) of the means of ``forward_mean``, from its ``state``;
    ``grad_means`` holds each segment's upstream gradient ([P]), None for a segment whose mean
    received none."""
    buffer, plan = state
    q = q.contiguous()
    k = q if one_tower else k.contiguous()
    m, p = q.shape[0], row_keys.shape[1]
    stats = plan.mean_stats
    out = buffer[m * (1 + stats) :]
    has = 0
    upstream = [out, out]
    for segment, grad in enumerate(grad_means):
        if grad is not None:
            has |= 1 << segment
            upstream[segment] = grad if grad.dtype == torch.float32 and grad.is_contiguous() else grad.float().contiguous()
    keys = (row_keys, col_keys, row_groups, col_groups)
    segments = 1 if boundary >= m else 2
    return _launch_backward(
        plan, (out, *upstream, out), q, k, keys, buffer, buffer[m:], stats, self_offset, boundary, one_tower,
        (segments, has),
    )  # fmt: skip
