"""Tile tables and the choices made from shapes for the Triton loss kernels.

What the kernels (triton_kernels.py) and their launchers (triton_launch.py) decide on the host
before a launch: the exponent mode for tau and D (``bounded``, ``bounded_backward``), the
candidate tiles per width and mode with the autotuner's configurations and pruning, and the
column splits of each direction. Nothing here imports the kernels: the kernels import the
configurations and pruning for their autotune decorators, the launchers the rest.
"""

from __future__ import annotations

import os

import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("SUNCET_TRITON_AUTOTUNE", "1") != "0"

LOG2E = 1.4426950408889634
_BOUNDED_SCALE2 = 48.0  # tau >= 0.03006: exponents relative to the bound stay within [-97, 0.5]

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per D class (D <= 128, D <= 256); the first entry is
# the one used when autotuning is off. Candidates are compiled ahead of time for sm_90
# (benchmarks/kernel_registers.py: triton.compile with a GPUTarget and ptxas -v, no GPU needed);
# the tables keep those that fit Hopper's 227 KiB of shared memory and do not spill registers with
# one key set; a few backward tiles spill a little with two (docs/kernels.md lists them), and
# stay for the autotuner to weigh on the card against those that do not. Which is fastest is for
# the autotuner to find; the 4-warp, 64-row tiles are there because they fit more programs per
# multiprocessor, which a latency-bound loop needs.
FORWARD_TABLE = {
    128: [
        (128, 64, 8, 3),
        (64, 64, 8, 3),
        (128, 32, 8, 3),
        (64, 64, 4, 3),
        (128, 64, 8, 4),
        (128, 32, 8, 4),
        (64, 128, 8, 3),
        (64, 32, 4, 3),
        (64, 32, 4, 4),
    ],
    256: [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
}
# The running-maxima backward: tau < 0.03006, or D > 128.
BACKWARD_TABLE = {
    128: [
        (64, 64, 8, 2),
        (64, 32, 8, 2),
        (128, 32, 8, 2),
        (64, 32, 4, 3),
        (64, 64, 8, 3),
        (128, 32, 8, 3),
        (128, 16, 8, 2),
    ],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (64, 16, 8, 2)],
}
# The bounded backward (D <= 128): its similarity tile feeds the second product through plain
# arithmetic, so Triton lays the first product over warps along the rows only ([warps, 1]): a
# 64-row tile on 8 warps would compute it twice, hence 128 rows on 8 warps or 64 on 4 (flash
# attention's layout). Tiles with BLOCK_N = 64 spill here, and at D = 256 every candidate does,
# so D > 128 keeps the running-maxima backward.
BOUNDED_BACKWARD_TABLE = {
    128: [(64, 32, 4, 3), (128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2), (128, 16, 8, 3), (128, 16, 8, 2)],
}
# (128, 16, 8, 2), last in both backward tables, is there for sm_80 (A100, mma.sync), where it is
# the one tile that spills in neither mode.
# The interpreter runs block operations in NumPy: one small tile, no tuning.
INTERPRETER_TILE = (16, 16, 4, 1)
FINISH_BLOCK = 1024  # rows per program of the finishing kernel

MAX_BACKWARD_SPLITS = 8
SPLIT_COLUMNS = 512  # the fewest columns a backward split walks


def width(d: int) -> int:
    """The D class of the tables: 128 or 256."""
    return 128 if d <= 128 else 256


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def tile_of(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _config(tile: tuple[int, int, int, int]) -> triton.Config:
    m, n, warps, stages = tile
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def forward_configs() -> list[triton.Config]:
    if INTERPRETING:
        return [_config(INTERPRETER_TILE)]
    return [_config(tile) for tile in dict.fromkeys(t for tiles in FORWARD_TABLE.values() for t in tiles)]


def first_forward_config(d: int) -> triton.Config:
    """The forward's untuned tile for width ``d``: what a launch takes where it may not benchmark."""
    return _config(INTERPRETER_TILE if INTERPRETING else FORWARD_TABLE[width(d)][0])


def prune_forward(configs, named_args, **kwargs):
    if INTERPRETING:
        return configs
    tiles = FORWARD_TABLE[width(named_args["D"])]
    wanted = tiles if AUTOTUNE else tiles[:1]
    return [c for c in configs if tile_of(c) in wanted]


def backward_tiles(d: int, bounded: bool) -> list[tuple[int, int, int, int]]:
    """The backward's candidate tiles for width ``d`` in its mode, the first being the one used untuned."""
    return (BOUNDED_BACKWARD_TABLE if bounded else BACKWARD_TABLE)[width(d)]


def first_backward_config(d: int, bounded: bool) -> triton.Config:
    """The backward's untuned tile for width ``d`` in its mode."""
    return _config(INTERPRETER_TILE if INTERPRETING else backward_tiles(d, bounded)[0])


def backward_configs() -> list[triton.Config]:
    if INTERPRETING:
        return [_config(INTERPRETER_TILE)]
    tables = (BACKWARD_TABLE, BOUNDED_BACKWARD_TABLE)
    return [_config(tile) for tile in dict.fromkeys(t for table in tables for tiles in table.values() for t in tiles)]


def prune_backward(configs, named_args, **kwargs):
    if INTERPRETING:
        return configs
    tiles = backward_tiles(named_args["D"], kwargs.get("BOUNDED", named_args.get("BOUNDED")))
    wanted = tiles if AUTOTUNE else tiles[:1]
    return [c for c in configs if tile_of(c) in wanted]


def bounded(tau: float) -> bool:
    """Whether exponents may be taken relative to the fixed bound log2(e) / tau of s2 (unit
    rows) instead of running maxima: they then span at most 2 * 1.01 * log2(e) / tau, which must
    stay clear of fp32's smallest normal exponent (-126) for the sums to keep full precision."""
    return LOG2E / tau <= _BOUNDED_SCALE2


def bounded_backward(tau: float, d: int) -> bool:
    """Whether the backward takes exponents relative to the bound (it has tiles for D <= 128)."""
    return bounded(tau) and width(d) in BOUNDED_BACKWARD_TABLE


def forward_splits(m: int, n: int, sms: int) -> int:
    """Column splits that bring the forward grid to about four 128-row programs per
    multiprocessor, each split keeping at least 1,024 columns: several waves of programs keep
    the last one's idle share small whatever the autotuned tile fits per multiprocessor. No
    multiprocessors (``sms`` 0): not a GPU, one split."""
    if sms == 0:
        return 1
    row_tiles = triton.cdiv(m, 128)
    return max(1, min(triton.cdiv(4 * sms, row_tiles), n // 1024, 8))


def backward_splits(rows: int, cols: int, sms: int, block_m: int) -> int:
    """Column splits that bring the backward's row tiles (``rows`` in all, both sides of a
    two-tower launch) to about two programs per multiprocessor: one full wave of 4-warp programs
    or two of 8-warp ones (about 250 registers a thread: two or one fit), each split keeping at
    least SPLIT_COLUMNS columns so that its fixed costs stay small beside its loop. No
    multiprocessors (``sms`` 0): not a GPU, one split."""
    if sms == 0:
        return 1
    return max(1, min(2 * sms // triton.cdiv(rows, block_m), cols // SPLIT_COLUMNS, MAX_BACKWARD_SPLITS))
