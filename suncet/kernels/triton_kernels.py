"""The Triton kernels of the fused multi-positive contrastive loss: jitted code only.

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
through tf32 unless the launcher asks for ``ieee``. Tiles whose row and column groups cannot
meet are not visited. Non-finite inputs give NaN losses and gradients. See docs/kernels.md for
the numerics.

The tile tables and the autotuner's pruning are in triton_tiles.py, the launchers, their plans
and the entry points in triton_launch.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from suncet.kernels import triton_tiles as tiles

# `# fmt: skip` keeps the kernels' argument lists as tables: pointers, sizes, then compile-time
# constants, a group a line (one argument a line would triple these signatures).

_FLOOR = tl.constexpr(-1.0e30)  # start of running maxima: finite, so -inf (masked) minus it stays -inf
_DEAD = tl.constexpr(1.0e30)  # exponent offset of rows that receive no gradient: exp2(s - _DEAD) == 0
_SCAN = tl.constexpr(4096)  # column groups read at once by the range scan


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
    """Rows ``idx``: their ids, (group, key0, key1) in int64 (key1 is key0 again when P == 1);
    the range [lo, hi] of their groups; and 1 where some key or group of theirs is not exact in
    fp32."""
    group, lo, hi = _tile_group_range(groups_ptr, idx, ok)
    key0 = tl.load(keys_ptr + idx * P, mask=ok, other=0)
    wide = tl.maximum(_wide(group, ok), _wide(key0, ok))
    key1 = key0
    if P == 2:
        key1 = tl.load(keys_ptr + idx * P + 1, mask=ok, other=0)
        wide = tl.maximum(wide, _wide(key1, ok))
    return (group, key0, key1), lo, hi, wide


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
def _key_matches(key_words, fast_keys, P: tl.constexpr):
    """Matches (``_match``) of rows with ``fast_keys`` against a column tile (``_column_keys``)."""
    c0, c1 = _column_keys(key_words, P)
    m0 = _match(fast_keys[0], c0.to(tl.float32))
    m1 = m0
    if P == 2:
        m1 = _match(fast_keys[1], c1.to(tl.float32))
    return m0, m1


@triton.jit
def _key_range(keys, ok):
    """The smallest and largest of ``keys`` where ``ok``, as int32 (exact where the fast tiles use it)."""
    lo = tl.min(tl.where(ok, keys, 2147483647), 0).to(tl.int32)
    hi = tl.max(tl.where(ok, keys, -2147483647), 0).to(tl.int32)
    return lo, hi


@triton.jit
def _fast_keys(row_ids, ok):
    """The keys of rows ``row_ids`` (``_row_attributes``) as the fast tiles compare them: (key0,
    key1 in fp32, then the int32 range of each set over ``ok``: lo0, hi0, lo1, hi1)."""
    _, key0, key1 = row_ids
    key0_f = key0.to(tl.float32)
    key1_f = key1.to(tl.float32)
    lo0, hi0 = _key_range(key0, ok)
    lo1, hi1 = _key_range(key1, ok)
    return key0_f, key1_f, lo0, hi0, lo1, hi1


@triton.jit
def _may_match(col_keys32, lo, hi):
    """Whether some key of a column tile lies in the rows' range [lo, hi]. Where none does, the
    set's matches on the tile are all 0 and the tile skips them: NT-Xent's instance ids, for
    one, meet on few tiles."""
    return (tl.min(col_keys32, 0) <= hi) & (lo <= tl.max(col_keys32, 0))


@triton.jit
def _masked_entries(
    groups_ptr, keys_ptr, rows, cols, col_ok, row_ids, self_offset, ROWS_OF_Q: tl.constexpr, P: tl.constexpr
):  # fmt: skip
    """A general tile's masks from the int64 ids of its rows ``rows`` (``row_ids``, from
    ``_row_attributes``) and of its columns ``cols`` (at ``groups_ptr``/``keys_ptr``): the
    allowed entries (the column exists and is in the row's group, and the pair is not row i of
    q with its own column i + self_offset; ROWS_OF_Q: the tile's rows are rows of q, otherwise
    columns of k) and, per key set, the entries whose keys match (set 0's again when P == 1)."""
    group, key0, key1 = row_ids
    col_group = tl.load(groups_ptr + cols, mask=col_ok, other=0)
    allowed = col_ok[None, :] & (group[:, None] == col_group[None, :])
    if ROWS_OF_Q:
        allowed = allowed & (cols[None, :] != rows[:, None] + self_offset)
    else:
        allowed = allowed & (rows[:, None] != cols[None, :] + self_offset)
    member0 = key0[:, None] == tl.load(keys_ptr + cols * P, mask=col_ok, other=0)[None, :]
    member1 = member0
    if P == 2:
        member1 = key1[:, None] == tl.load(keys_ptr + cols * P + 1, mask=col_ok, other=0)[None, :]
    return allowed, member0, member1


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
    configs=tiles.forward_configs(),
    key=["ROWS_BUCKET", "COLS_BUCKET", "D", "P", "BOUNDED"],
    prune_configs_by={"early_config_prune": tiles.prune_forward},
    cache_results=True,  # the tile chosen once is read back by later processes: the same sums, in the same order
)
@triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})
@triton.jit(do_not_specialize=["self_offset", "ROWS_BUCKET", "COLS_BUCKET"])  # one compilation for every rank's offset
def forward_kernel(
    q_ptr, k_ptr, row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr,
    partial_ptr, loss_ptr, valid_ptr, stats_ptr,
    M, N, D, self_offset, scale2, ROWS_BUCKET, COLS_BUCKET,
    P: tl.constexpr, BOUNDED: tl.constexpr, INVERSE: tl.constexpr, STATS: tl.constexpr, CHECK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """``stats_ptr``: the rows' statistics for the backward, one a row ([M]) then STATS a row."""
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
    row_ids, rg_lo, rg_hi, rows_wide = _row_attributes(row_keys_ptr, row_groups_ptr, rows, row_ok, P)
    fast_keys = _fast_keys(row_ids, row_ok)
    key0_f, key1_f, key0_lo, key0_hi, key1_lo, key1_hi = fast_keys
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
                match0, match1 = _key_matches(key_words, fast_keys, P)
                max_all, sum_all, max0, sum0, max1, sum1 = _accumulate(
                    s2, match0 > 0.5, match1 > 0.5, max_all, sum_all, max0, sum0, max1, sum1, P, BOUNDED
                )
        else:
            allowed, member0, member1 = _masked_entries(
                col_groups_ptr, col_keys_ptr, rows, cols, col_ok, row_ids, self_offset, True, P
            )
            max_all, sum_all, max0, sum0, max1, sum1 = _accumulate(
                tl.where(allowed, s2, float("-inf")), member0, member1, max_all, sum_all, max0, sum0, max1, sum1,
                P, BOUNDED,
            )  # fmt: skip
        group_words += 2 * BLOCK_N
        key_words += 2 * P * BLOCK_N

    sum_all += poison
    if splits == 1:
        _finalize_rows(
            rows, row_ok, max_all, sum_all, max0, sum0, max1, sum1, loss_ptr, valid_ptr, stats_ptr, stats_ptr + M,
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
def _finalize_set(rows, row_ok, lse_all2, bad, sum_all, max_p, sum_p, p: tl.constexpr, loss_ptr, valid_ptr,
                  stats_pos_ptr, P: tl.constexpr, INVERSE: tl.constexpr, STATS: tl.constexpr):  # fmt: skip
    ln2 = 0.6931471805599453
    valid = sum_p > 0
    # log2 of a positive stand-in where a sum is 0, so that no -inf - -inf is ever formed.
    lse2 = tl.where(valid, max_p + tl.log2(tl.where(valid, sum_p, 1.0)), float("-inf"))
    loss = tl.where(valid, (lse_all2 - tl.where(valid, lse2, 0.0)) * ln2, 0.0) + bad
    tl.store(valid_ptr + rows * P + p, valid, mask=row_ok)
    tl.store(loss_ptr + rows * P + p, loss, mask=row_ok)
    if INVERSE:
        tl.store(stats_pos_ptr + rows * STATS + p, tl.where(valid, 1.0 / tl.where(valid, sum_p, 1.0), 0.0), mask=row_ok)
        if STATS == 2 * P:  # the set's share of the denominator's factor: 0 for an invalid set
            share = tl.where(valid, 1.0 / tl.where(valid, sum_all, 1.0), 0.0) + bad
            tl.store(stats_pos_ptr + rows * STATS + P + p, share, mask=row_ok)
    else:
        tl.store(stats_pos_ptr + rows * STATS + p, lse2 * ln2, mask=row_ok)
    return loss, valid


@triton.jit
def _finalize_rows(
    rows, row_ok, max_all, sum_all, max0, sum0, max1, sum1, loss_ptr, valid_ptr, stats_all_ptr, stats_pos_ptr,
    P: tl.constexpr, INVERSE: tl.constexpr, STATS: tl.constexpr,
):  # fmt: skip
    """Writes each row's losses, valid flags and the statistics its backward reads (one at
    stats_all_ptr, STATS at stats_pos_ptr): the LSEs, or with INVERSE (bounded mode) the
    inverses of the sums relative to the bound, 0 for a set without a positive, so that the
    backward's factors take no exponential; with STATS = 2 P also each set's share of the
    denominator's inverse, which spares the backward a validity test per column. Returns the
    losses and flags of both sets (set 0's again when P == 1)."""
    ln2 = 0.6931471805599453
    bad = sum_all * 0.0  # NaN where a non-finite input reached the row
    lse_all2 = tl.where(sum_all > 0, max_all + tl.log2(tl.where(sum_all > 0, sum_all, 1.0)), float("-inf")) + bad
    loss0, valid0 = _finalize_set(
        rows, row_ok, lse_all2, bad, sum_all, max0, sum0, 0, loss_ptr, valid_ptr, stats_pos_ptr, P, INVERSE, STATS
    )
    loss1 = loss0
    valid1 = valid0
    if P == 2:
        loss1, valid1 = _finalize_set(
            rows, row_ok, lse_all2, bad, sum_all, max1, sum1, 1, loss_ptr, valid_ptr, stats_pos_ptr, P, INVERSE, STATS
        )
    if INVERSE:
        any_valid = valid0 | valid1
        tl.store(
            stats_all_ptr + rows, tl.where(any_valid, 1.0 / tl.where(any_valid, sum_all, 1.0), 0.0) + bad, mask=row_ok
        )
    else:
        tl.store(stats_all_ptr + rows, lse_all2 * ln2, mask=row_ok)
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
def finish_kernel(
    partial_ptr, loss_ptr, valid_ptr, stats_ptr, block_sums_ptr, ticket_ptr, mean0_ptr, mean1_ptr,
    M, splits, boundary,
    P: tl.constexpr, INVERSE: tl.constexpr, STATS: tl.constexpr, MERGE: tl.constexpr, MEANS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per block of rows. MERGE: merges the column splits' partial statistics and
    finalises the rows. MEANS: the masked means of the losses over each segment of rows and
    each key set, the means [P] of segment 0 and of segment 1, and the valid counts [2, P] by
    (segment, set) after the rows' statistics (``stats_ptr``: [M], then STATS a row, then the
    counts). Each block stores its
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
            rows, row_ok, max_all, sum_all, max0, sum0, max1, sum1, loss_ptr, valid_ptr, stats_ptr, stats_ptr + M,
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
            means = sums / tl.maximum(counts, 1.0)
            tl.store(mean0_ptr + lanes, means, mask=lanes < P)
            tl.store(mean1_ptr + lanes - P, means, mask=lanes >= P)
            tl.store(stats_ptr + M * (1 + STATS) + lanes, counts)
            tl.atomic_xchg(ticket_ptr, 0)


# Which terms of the gradient a backward program forms: bits of ``_backward_tile``'s SIDES.
_ROW_SIDE = tl.constexpr(1)  # its rows are rows of q, the tiles' columns rows of k: G k
_COLUMN_SIDE = tl.constexpr(2)  # its rows are rows of k, the tiles' columns rows of q: G^T q
_SHARED_IDS = tl.constexpr(4)  # with both: rows and columns have the same key and group arrays


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
    grad_ptr, lse_all_ptr, lse_pos_ptr, idx, ok, boundary, coefs, P: tl.constexpr, MEAN: tl.constexpr
):  # fmt: skip
    """Per row ``idx`` of q and membership code c: the exponent offset (log2 units) and
    coefficient with dL/ds_ij = coef_c(i) * exp2(s2_ij - offset_c(i)); returns the offsets of
    codes 0..3, then their coefficients (codes 2 and 3 repeat 0 when P == 1). Rows that are not
    ``ok`` or receive no gradient get offset _DEAD and coefficient 0. ``coefs``: see
    ``_mean_coefficients``."""
    log2e = 1.4426950408889634
    lse_all = tl.load(lse_all_ptr + idx, mask=ok, other=0.0) * log2e
    lse0 = tl.load(lse_pos_ptr + idx * P, mask=ok, other=float("-inf"))
    valid0 = lse0 > float("-inf")
    lse0 = tl.where(valid0, lse0 * log2e, 0.0)
    g0 = tl.where(valid0, _upstream(grad_ptr, idx, ok, boundary, coefs[0], coefs[2], 0, P, MEAN), 0.0)
    if P == 1:
        o0 = tl.where(valid0, lse_all, _DEAD)
        o1 = tl.where(valid0, lse0, _DEAD)
        c1 = tl.where(valid0, g0 * (tl.exp2(lse0 - lse_all) - 1.0), 0.0)
        return o0, o1, o0, o0, g0, c1, g0, g0
    else:
        lse1 = tl.load(lse_pos_ptr + idx * P + 1, mask=ok, other=float("-inf"))
        valid1 = lse1 > float("-inf")
        lse1 = tl.where(valid1, lse1 * log2e, 0.0)
        g1 = tl.where(valid1, _upstream(grad_ptr, idx, ok, boundary, coefs[1], coefs[3], 1, P, MEAN), 0.0)
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
    grad_ptr, inv_all_ptr, inv_pos_ptr, idx, ok, boundary, coefs, P: tl.constexpr, MEAN: tl.constexpr,
    STATS: tl.constexpr,
):  # fmt: skip
    """Per row ``idx`` of q, with every exponent taken relative to the bound scale2:
    dL/ds_ij = exp2(s2_ij - scale2) * (all_i - [j in set 0] pos0_i - [j in set 1] pos1_i), where
    all = (g0 + g1) / sum_all and pos_p = g_p / sum_p, the sums relative to the bound. The
    forward stored their inverses (0 for a set without a positive, which then takes no gradient),
    so no exponential is needed here; with STATS = 2 P it also stored each set's share of
    1 / sum_all, which needs no validity test. Returns (all, pos0, pos1)."""
    if STATS == 2 * P:
        u0 = _upstream(grad_ptr, idx, ok, boundary, coefs[0], coefs[2], 0, P, MEAN)
        all_ = u0 * tl.load(inv_pos_ptr + idx * STATS + P, mask=ok, other=0.0)
        pos0 = u0 * tl.load(inv_pos_ptr + idx * STATS, mask=ok, other=0.0)
        pos1 = pos0
        if P == 2:
            u1 = _upstream(grad_ptr, idx, ok, boundary, coefs[1], coefs[3], 1, P, MEAN)
            all_ += u1 * tl.load(inv_pos_ptr + idx * STATS + P + 1, mask=ok, other=0.0)
            pos1 = u1 * tl.load(inv_pos_ptr + idx * STATS + 1, mask=ok, other=0.0)
        return all_, pos0, pos1
    inv0 = tl.load(inv_pos_ptr + idx * P, mask=ok, other=0.0)
    g0 = tl.where(inv0 > 0, _upstream(grad_ptr, idx, ok, boundary, coefs[0], coefs[2], 0, P, MEAN), 0.0)
    g_sum = g0
    pos0 = g0 * inv0
    pos1 = pos0
    if P == 2:
        inv1 = tl.load(inv_pos_ptr + idx * P + 1, mask=ok, other=0.0)
        g1 = tl.where(inv1 > 0, _upstream(grad_ptr, idx, ok, boundary, coefs[1], coefs[3], 1, P, MEAN), 0.0)
        g_sum += g1
        pos1 = g1 * inv1
    return g_sum * tl.load(inv_all_ptr + idx, mask=ok, other=0.0), pos0, pos1


@triton.jit
def _side_factors(
    upstream, stats, idx, ok, boundary, coefs, P: tl.constexpr, MEAN: tl.constexpr, STATS: tl.constexpr,
    BOUNDED: tl.constexpr,
):  # fmt: skip
    """What one side's weights (``_weight``) need of rows ``idx`` of q, from the statistics the
    forward stored: BOUNDED, ``_bounded_factors`` from the inverse sums; otherwise
    ``_gradient_tables`` from the LSEs."""
    if BOUNDED:
        return _bounded_factors(upstream[0], stats[0], stats[1], idx, ok, boundary, coefs, P, MEAN, STATS)
    else:
        return _gradient_tables(upstream[0], stats[0], stats[1], idx, ok, boundary, coefs, P, MEAN)


@triton.jit
def _bounded_weight(member0, member1, all_, pos0, pos1, P: tl.constexpr):
    w = all_ - tl.where(member0, pos0, 0.0)
    if P == 2:
        w -= tl.where(member1, pos1, 0.0)
    return w


@triton.jit
def _bounded_side(key_words, keys, all_, pos0, pos1, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One side's bounded weight on a fast tile, ``all - [same key 0] pos0 - [same key 1] pos1``
    (the factors broadcast to the tile), matching this program's row keys (``keys``, from
    ``_fast_keys``) against the tile's (at ``key_words``), a key set's term only where its
    keys can meet (``_may_match``)."""
    key0_f, key1_f, lo0, hi0, lo1, hi1 = keys
    k0, k1 = _column_keys(key_words, P)
    w = tl.broadcast_to(all_, (BLOCK_M, BLOCK_N))
    if _may_match(k0, lo0, hi0):
        w -= _match(key0_f, k0.to(tl.float32)) * pos0
    if P == 2:
        if _may_match(k1, lo1, hi1):
            w -= _match(key1_f, k1.to(tl.float32)) * pos1
    return w


@triton.jit
def _mean_coefficients(upstream, P: tl.constexpr, MEAN: tl.constexpr):
    """d mean / d loss of a valid row, per (segment, set), as (c00, c01, c10, c11) by segment
    then set: the mean's upstream gradient over the segment's valid count, from ``upstream`` =
    (per-row gradient, the gradients [P] of the means of segments 0 and 1, the forward's valid
    counts [2, P])."""
    _, gmean0_ptr, gmean1_ptr, counts_ptr = upstream
    c00 = 0.0
    c01 = 0.0
    c10 = 0.0
    c11 = 0.0
    if MEAN > 0:
        c00 = tl.load(gmean0_ptr) / tl.maximum(tl.load(counts_ptr), 1.0)
        if P == 2:
            c01 = tl.load(gmean0_ptr + 1) / tl.maximum(tl.load(counts_ptr + 1), 1.0)
    if MEAN > 1:
        c10 = tl.load(gmean1_ptr) / tl.maximum(tl.load(counts_ptr + P), 1.0)
        if P == 2:
            c11 = tl.load(gmean1_ptr + 1) / tl.maximum(tl.load(counts_ptr + P + 1), 1.0)
    return c00, c01, c10, c11


@triton.jit
def _along(x, ROWS: tl.constexpr):
    """Numbers ``x`` of a tile's rows (ROWS) or of its columns, shaped to broadcast over the tile."""
    if ROWS:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _weight(s2, member0, member1, factors, ROWS: tl.constexpr, P: tl.constexpr, BOUNDED: tl.constexpr):
    """dL/ds of one side per entry, from the ``_side_factors`` of the tile's rows (ROWS) or of
    its columns: BOUNDED, to be multiplied by the shared exponential; otherwise the offset and
    coefficient of each entry's membership code, with the side's own exponential."""
    if BOUNDED:
        return _bounded_weight(
            member0, member1, _along(factors[0], ROWS), _along(factors[1], ROWS), _along(factors[2], ROWS), P
        )
    else:
        offset = _select_code(
            member0, member1, _along(factors[0], ROWS), _along(factors[1], ROWS), _along(factors[2], ROWS),
            _along(factors[3], ROWS), P,
        )  # fmt: skip
        coef = _select_code(
            member0, member1, _along(factors[4], ROWS), _along(factors[5], ROWS), _along(factors[6], ROWS),
            _along(factors[7], ROWS), P,
        )  # fmt: skip
        return coef * tl.exp2(s2 - offset)


@triton.jit
def _store_gradient(out_ptr, rows, row_ok, dims, D, value, EVEN_D: tl.constexpr):
    out = value.to(out_ptr.dtype.element_ty)
    if EVEN_D:
        tl.store(out_ptr + rows[:, None] * D + dims[None, :], out, mask=row_ok[:, None])
    else:
        tl.store(out_ptr + rows[:, None] * D + dims[None, :], out, mask=row_ok[:, None] & (dims < D)[None, :])


@triton.jit
def _store_split(
    out, acc, poison, rows, row_ok, dims, D, inv_tau, A_COUNT,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Stores this column split's share ``acc`` of the gradient rows ``rows``, ``out`` being
    (gradient, partial sums, the row tile's ticket): with one split, the gradient itself;
    otherwise its fp32 share, and the last split of the row tile to arrive (the int32 ticket)
    adds the shares in split order, so the result does not depend on the order the splits ran
    in, writes the gradient and resets the ticket for the next launch."""
    out_ptr, partial_ptr, ticket_ptr = out
    split = tl.program_id(1)
    splits = tl.num_programs(1)
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


@triton.autotune(
    configs=tiles.backward_configs(),
    key=["ROWS_BUCKET", "COLS_BUCKET", "D", "P", "BOUNDED", "MEAN", "TWO_SIDES"],
    prune_configs_by={"early_config_prune": tiles.prune_backward},
    cache_results=True,
)
@triton.heuristics({"EVEN_N": lambda args: args["M"] % args["BLOCK_N"] == 0 and args["N"] % args["BLOCK_N"] == 0})
@triton.jit(do_not_specialize=["self_offset", "boundary", "ROWS_BUCKET", "COLS_BUCKET"])
def backward_kernel(
    q_ptr, k_ptr, dq_ptr, dk_ptr, partial_ptr, tickets_ptr, grad_ptr, gmean0_ptr, gmean1_ptr,
    stats_ptr, row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr,
    M, N, D, self_offset, boundary, scale2, inv_tau, ROWS_BUCKET, COLS_BUCKET,
    P: tl.constexpr, TWO_SIDES: tl.constexpr, SYMMETRIC: tl.constexpr,
    BOUNDED: tl.constexpr, STATS: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """dq and dk in one launch. One tower (not TWO_SIDES): each program takes a row tile of q
    through both sides, dq = (G + G^T) q / tau. Two towers: the first programs take q's row
    tiles (row side, dq = G k / tau), the others k's (column side, dk = G^T q / tau). Column
    splits (grid axis 1) walk shares of the column tiles and add them deterministically
    (``_store_split``). Every output element is written by one program: deterministic.
    ``stats_ptr`` holds what the forward stored for this mode ([M], then STATS a row, then with
    MEAN the valid counts [2, P]): the inverse
    sums with BOUNDED, the LSEs otherwise. ``ROWS_BUCKET`` and ``COLS_BUCKET``, the row counts
    rounded up to a power of two, key the autotuner's choice (a new batch size in the same
    bucket reuses it)."""
    pid = tl.program_id(0)
    q_tiles = tl.cdiv(M, BLOCK_M)
    ids = (row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr)
    upstream = (grad_ptr, gmean0_ptr, gmean1_ptr, stats_ptr + M * (1 + STATS))
    stats = (stats_ptr, stats_ptr + M)
    if not TWO_SIDES:
        _backward_tile(
            pid, (q_ptr, M), (k_ptr, M), (dq_ptr, partial_ptr, tickets_ptr + pid), ids, upstream, stats,
            D, self_offset, boundary, scale2, inv_tau, _ROW_SIDE | _COLUMN_SIDE | (_SHARED_IDS if SYMMETRIC else 0),
            P, BOUNDED, STATS, MEAN, BLOCK_D, EVEN_D, PRECISION, BLOCK_M, BLOCK_N, EVEN_N,
        )  # fmt: skip
    elif pid < q_tiles:
        _backward_tile(
            pid, (q_ptr, M), (k_ptr, N), (dq_ptr, partial_ptr, tickets_ptr + pid), ids, upstream, stats,
            D, self_offset, boundary, scale2, inv_tau, _ROW_SIDE,
            P, BOUNDED, STATS, MEAN, BLOCK_D, EVEN_D, PRECISION, BLOCK_M, BLOCK_N, EVEN_N,
        )  # fmt: skip
    else:  # k's partial sums after q's
        _backward_tile(
            pid - q_tiles, (k_ptr, N), (q_ptr, M),
            (dk_ptr, partial_ptr + tl.num_programs(1) * M * BLOCK_D, tickets_ptr + pid),
            ids, upstream, stats, D, self_offset, boundary, scale2, inv_tau, _COLUMN_SIDE,
            P, BOUNDED, STATS, MEAN, BLOCK_D, EVEN_D, PRECISION, BLOCK_M, BLOCK_N, EVEN_N,
        )  # fmt: skip


@triton.jit
def _backward_tile(
    pid, a_rows, b_rows, out, ids, upstream, stats, D, self_offset, boundary, scale2, inv_tau,
    SIDES: tl.constexpr, P: tl.constexpr, BOUNDED: tl.constexpr, STATS: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """Row tile ``pid`` of d a = (1/tau) sum_b H_ab b_b, for the terms in SIDES (``_ROW_SIDE``:
    a are rows of q, b rows of k; ``_COLUMN_SIDE``: a are rows of k, the loss's columns, b rows
    of q, the transposed term; ``_SHARED_IDS``: both sides' memberships are one match per
    entry). ``a_rows``, ``b_rows``: (pointer, row count) of a and b; ``out``: see
    ``_store_split``; ``ids``: (row keys, column keys, row groups, column groups) of the loss;
    ``upstream``: the per-row upstream gradient (MEAN = 0) or, with MEAN = 1 or 2 segments,
    that of the masked means (``_mean_coefficients``); ``stats``: the forward's statistics per
    row (all columns, each key set), inverse sums with BOUNDED and LSEs otherwise."""
    a_ptr, A_COUNT = a_rows
    b_ptr, B_COUNT = b_rows
    row_keys_ptr, col_keys_ptr, row_groups_ptr, col_groups_ptr = ids
    ROW_SIDE: tl.constexpr = (SIDES & _ROW_SIDE) != 0
    COL_SIDE: tl.constexpr = (SIDES & _COLUMN_SIDE) != 0
    SHARED_IDS: tl.constexpr = (SIDES & _SHARED_IDS) != 0
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row0 = pid * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < A_COUNT
    dims = tl.arange(0, BLOCK_D)
    a = _load_rows(a_ptr, rows, row_ok, dims, D, EVEN_D)
    poison = _non_finite(a)  # a non-finite row of a gets a NaN gradient row even where no loss reaches it
    coefs = _mean_coefficients(upstream, P, MEAN)

    # Row side: this program's rows as rows of q; column side: as columns of k.
    r_ids, r_lo, r_hi, r_wide = _row_attributes(row_keys_ptr, row_groups_ptr, rows, row_ok & ROW_SIDE, P)
    c_ids, c_lo, c_hi, c_wide = _row_attributes(col_keys_ptr, col_groups_ptr, rows, row_ok & COL_SIDE, P)
    r_factors = _side_factors(upstream, stats, rows, row_ok & ROW_SIDE, boundary, coefs, P, MEAN, STATS, BOUNDED)
    if ROW_SIDE:
        first, last, wide = _column_scan(
            col_groups_ptr, col_keys_ptr, r_lo, r_hi, row_groups_ptr, row_keys_ptr, c_lo, c_hi, B_COUNT,
            P, COL_SIDE and not SHARED_IDS, BLOCK_N,
        )  # fmt: skip
    else:
        first, last, wide = _column_scan(
            row_groups_ptr, row_keys_ptr, c_lo, c_hi, row_groups_ptr, row_keys_ptr, c_lo, c_hi, B_COUNT,
            P, False, BLOCK_N,
        )  # fmt: skip
    # Fast tiles: full, one group on each side, off the self diagonal, ids within int32.
    narrow = (tl.maximum(tl.maximum(r_wide, c_wide), wide) == 0) & ((r_lo == r_hi) | (not ROW_SIDE))
    narrow = narrow & ((c_lo == c_hi) | (not COL_SIDE))
    r_keys = _fast_keys(r_ids, row_ok)
    c_keys = _fast_keys(c_ids, row_ok)
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
        b = _load_tile(
            b_ptr + col0 * D + tl.arange(0, BLOCK_N)[:, None] * D + dims[None, :], col_ok, dims, D, EVEN_D, EVEN_N
        )
        col_key_words = _low_words(col_keys_ptr) + 2 * P * cols
        row_key_words = _low_words(row_keys_ptr) + 2 * P * cols
        col_group_words = _low_words(col_groups_ptr) + 2 * cols
        row_group_words = _low_words(row_groups_ptr) + 2 * cols
        s2 = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        if COL_SIDE:  # the columns' numbers, as rows of q
            c_factors = _side_factors(upstream, stats, cols, col_ok, boundary, coefs, P, MEAN, STATS, BOUNDED)
        fast = narrow & (col0 + BLOCK_N <= B_COUNT)
        if ROW_SIDE:
            fast = fast & ((col0 + BLOCK_N <= row0 + self_offset) | (row0 + BLOCK_M + self_offset <= col0))
            fast = fast & _tile_is_group(col_group_words, col_ok, r_lo.to(tl.int32))
        if COL_SIDE:
            fast = fast & ((row0 + BLOCK_M <= col0 + self_offset) | (col0 + BLOCK_N + self_offset <= row0))
            if not SHARED_IDS:
                fast = fast & _tile_is_group(row_group_words, col_ok, c_lo.to(tl.int32))
        if fast:
            h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if BOUNDED and SHARED_IDS:
                # one match per key set serves both sides: the factors add,
                # all_i + all_j - [same key 0] (pos0_i + pos0_j) - [same key 1] (pos1_i + pos1_j)
                h = _bounded_side(
                    col_key_words, r_keys, r_factors[0][:, None] + c_factors[0][None, :],
                    r_factors[1][:, None] + c_factors[1][None, :], r_factors[2][:, None] + c_factors[2][None, :],
                    P, BLOCK_M, BLOCK_N,
                )  # fmt: skip
            elif BOUNDED:  # each side on its own keys: all - [same key 0] pos0 - [same key 1] pos1
                if ROW_SIDE:
                    h += _bounded_side(
                        col_key_words, r_keys, r_factors[0][:, None], r_factors[1][:, None], r_factors[2][:, None],
                        P, BLOCK_M, BLOCK_N,
                    )  # fmt: skip
                if COL_SIDE:
                    h += _bounded_side(
                        row_key_words, c_keys, c_factors[0][None, :], c_factors[1][None, :], c_factors[2][None, :],
                        P, BLOCK_M, BLOCK_N,
                    )  # fmt: skip
            else:
                if ROW_SIDE:
                    rm0, rm1 = _key_matches(col_key_words, r_keys, P)
                if COL_SIDE:
                    if SHARED_IDS:
                        cm0 = rm0
                        cm1 = rm1
                    else:
                        cm0, cm1 = _key_matches(row_key_words, c_keys, P)
                if ROW_SIDE:
                    h += _weight(s2, rm0 > 0.5, rm1 > 0.5, r_factors, True, P, BOUNDED)
                if COL_SIDE:
                    h += _weight(s2, cm0 > 0.5, cm1 > 0.5, c_factors, False, P, BOUNDED)
        else:
            h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if ROW_SIDE:
                allowed, member0, member1 = _masked_entries(
                    col_groups_ptr, col_keys_ptr, rows, cols, col_ok, r_ids, self_offset, True, P
                )
                h += tl.where(allowed, _weight(s2, member0, member1, r_factors, True, P, BOUNDED), 0.0)
            if COL_SIDE:
                allowed, member0, member1 = _masked_entries(
                    row_groups_ptr, row_keys_ptr, rows, cols, col_ok, c_ids, self_offset, False, P
                )
                h += tl.where(allowed, _weight(s2, member0, member1, c_factors, False, P, BOUNDED), 0.0)
        if BOUNDED:
            # One exponential per entry serves both sides: their offsets are all scale2.
            h *= tl.exp2(s2 - scale2)
        if b.dtype == tl.float16:
            # A mean's gradient entries are about 1 / N^2, below fp16's normals at large N: each
            # row is scaled by a power of two to lie within (1/2, 1] before the cast, and the
            # product scaled back in fp32, so the rounding stays relative to the row's largest entry.
            top = tl.max(tl.abs(h), 1)
            exponent = tl.where(top > 0, tl.ceil(tl.log2(tl.where(top > 0, top, 1.0))), 0.0)
            product = tl.dot((h * tl.exp2(-exponent)[:, None]).to(b.dtype), b, input_precision=PRECISION)
            acc += product * tl.exp2(exponent)[:, None]
        else:
            acc += tl.dot(h.to(b.dtype), b, input_precision=PRECISION)
    _store_split(out, acc, poison, rows, row_ok, dims, D, inv_tau, A_COUNT, BLOCK_M, BLOCK_D, EVEN_D)
