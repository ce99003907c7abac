"""Registers, spills and main-loop SASS size of the Triton loss kernels for Hopper, without a GPU.

Compiles the kernels of suncet/kernels/triton_kernels.py in each tile configuration of
triton_tiles.py ahead of time for sm_90 (``triton.compile`` with a ``GPUTarget``, as the JIT
would specialise it: 16-byte aligned pointers, D divisible by 16), assembles the PTX with
Triton's ``ptxas`` and disassembles the cubin with its ``nvdisasm``. Per configuration it
reports the registers a thread, the spill stores, about how many programs fit on a
multiprocessor by registers (65,536 of them), and the SASS instructions of the main loop as laid
out: the longest span that ends in a branch back to its start and holds a tensor-core product
(masked path included); then, per similarity entry a thread holds (BLOCK_M x BLOCK_N / threads),
the instructions and exponentials (MUFU) on the loop's shortest path with every key set matched,
the one a full, group-uniform tile off the self diagonal takes, and the instructions on that
tile's path with 0, 1, ... key sets matched (the sets' skips taken in the order of the code): a
key set's work is skipped on tiles where its keys cannot meet (NT-Xent's instance ids meet on
few tiles, class labels on every one), so `bench kernels --loss both` runs the one-set path on
almost every tile. Static figures: what they predict about speed is for kernel_anatomy.py to
confirm on a card.

    python benchmarks/kernel_registers.py [--json FILE] [--dtype bf16] [--sets 2] [--upstream mean]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from suncet.bench import json_output
from suncet.engine.rundir import write_json, write_text
from suncet.kernels import triton_kernels as tk
from suncet.kernels import triton_tiles as tiles

# `# fmt: skip` keeps the kernels' argument types as tables: one group of arguments a line.

_ALIGNED = {
    "q_ptr", "k_ptr", "row_keys_ptr", "col_keys_ptr", "row_groups_ptr", "col_groups_ptr", "partial_ptr", "loss_ptr",
    "valid_ptr", "stats_ptr", "dq_ptr", "dk_ptr", "tickets_ptr", "grad_ptr", "gmean0_ptr", "gmean1_ptr", "D",
}  # fmt: skip
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def _types(kernel, dtype: str) -> dict[str, str]:
    ids = {name: "*i64" for name in ("row_keys_ptr", "col_keys_ptr", "row_groups_ptr", "col_groups_ptr")}
    buckets = {"ROWS_BUCKET": "i32", "COLS_BUCKET": "i32"}
    if kernel is tk.forward_kernel:
        return {"q_ptr": dtype, "k_ptr": dtype, **ids, "partial_ptr": "*fp32", "loss_ptr": "*fp32",
                "valid_ptr": "*i1", "stats_ptr": "*fp32", "M": "i32", "N": "i32", "D": "i32", "self_offset": "i32",
                "scale2": "fp32", **buckets}  # fmt: skip
    return {"q_ptr": dtype, "k_ptr": dtype, "dq_ptr": dtype, "dk_ptr": dtype, "partial_ptr": "*fp32",
            "tickets_ptr": "*i32", "grad_ptr": "*fp32", "gmean0_ptr": "*fp32", "gmean1_ptr": "*fp32",
            "stats_ptr": "*fp32", **ids, "M": "i32", "N": "i32", "D": "i32", "self_offset": "i32",
            "boundary": "i32", "scale2": "fp32", "inv_tau": "fp32", **buckets}  # fmt: skip


def _main_loop(sass: str) -> tuple[collections.Counter, list[collections.Counter]]:
    """Opcodes of the main loop (the longest span that branches back to its start, holds a
    tensor-core product and no EXIT), all of them, and those on its shortest paths for a full,
    group-uniform tile off the self diagonal (the fast tile) that matches 0, 1, ... key sets.

    A key set's matches are optional work: the kernels skip them on tiles where the set's keys
    cannot meet (a conditional forward branch over a block with no exponential and no product).
    Entry k of the list is the shortest path that takes none of those skips but the first
    len - 1 - k, so entry 0 skips them all and the last takes every key set's work."""
    lines = sass.splitlines()
    labels = {line.strip().rstrip(":"): i for i, line in enumerate(lines) if re.match(r"^\s*\.L_x_\d+:", line)}
    span = (0, -1)
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i:
            start = labels[target.group(1)]
            inside = lines[start : i + 1]
            # A branch back from past an EXIT returns from an out-of-line block (a warp-divergent
            # reduction's fallback, say) into the loop: not a loop of its own.
            loop = any("HGMMA" in b for b in inside) and not any(re.search(r"\bEXIT\b", b) for b in inside)
            if loop and i - start > span[1] - span[0]:
                span = (start, i)
    body = [(i, m.group(1)) for i in range(span[0], span[1] + 1) if (m := _INSTRUCTION.search(lines[i]))]
    every = collections.Counter(op for _, op in body)
    if not body:
        return every, [every]
    label_at = {
        name: next((n for n, (line, _) in enumerate(body) if line > at), len(body)) for name, at in labels.items()
    }
    branches = {}  # body index -> (target index, conditional)
    for n, (line, _) in enumerate(body):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", lines[line])
        if target:
            branches[n] = (label_at.get(target.group(1), -1), bool(re.search(r"@!?U?P[T0-9]+\s+BRA", lines[line])))
    optional = sorted(
        n for n, (to, conditional) in branches.items() if conditional and to > n and _skips_work(body, branches, n, to)
    )
    paths = [
        _shortest_path(body, branches, optional, set(optional[: len(optional) - k])) for k in range(len(optional) + 1)
    ]
    return every, [collections.Counter(body[n][1] for n in path) for path in paths]


def _skips_work(body: list, branches: dict, n: int, to: int) -> bool:
    """Whether the code after branch n, followed through unconditional branches only, comes to
    ``to`` with no exponential and no product on the way: the branch skips optional work."""
    at = n + 1
    while n < at < len(body) and at != to:
        if body[at][1] in ("MUFU", "HGMMA"):
            return False
        jump, conditional = branches.get(at, (-1, True))
        at = at + 1 if conditional else jump
    return at == to


def _shortest_path(body: list, branches: dict, optional: list[int], skippable: set[int]) -> list[int]:
    """Fewest instructions from the loop's first instruction to its back branch: each
    instruction falls through to the next unless it is an unconditional branch, and a branch
    also leads to its target (an optional skip only where ``skippable``)."""
    best = [None] * len(body)
    best[0] = [0]
    for n in range(len(body)):  # forward branches only inside the span, so one sweep suffices
        if best[n] is None:
            continue
        to, conditional = branches.get(n, (-1, True))
        successors = [n + 1] if conditional and n + 1 < len(body) else []
        if to > n and (n not in optional or n in skippable):
            successors.append(to)
        for succ in successors:
            if succ < len(body) and (best[succ] is None or len(best[n]) + 1 < len(best[succ])):
                best[succ] = best[n] + [succ]
    return best[-1] or list(range(len(body)))


def analyse(kernel, dtype: str, constants: dict, tile: tuple[int, int, int, int]) -> dict:
    block_m, block_n, warps, stages = tile
    constants = {**constants, "BLOCK_M": block_m, "BLOCK_N": block_n}
    types = _types(kernel, dtype)
    fn = kernel.fn
    while not isinstance(fn, JITFunction):  # through the autotuner and heuristics wrappers
        fn = fn.fn
    source = ASTSource(
        fn=fn,
        signature={**types, **{name: "constexpr" for name in constants}},
        constexprs=constants,
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in types if n in _ALIGNED},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        write_text(Path(ptx), compiled.asm["ptx"])
        report = subprocess.run(
            [_TOOLS / "ptxas", "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True, check=True
        ).stderr
        sass = subprocess.run([_TOOLS / "nvdisasm", "-c", cubin], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    loop, paths = _main_loop(sass)
    if len(paths) - 1 not in (0, constants["P"]):  # key-set skips: one per set in the bounded kernels
        raise RuntimeError(f"found {len(paths) - 1} optional branches in the main loop, expected 0 or {constants['P']}")
    fast = paths[-1]  # every key set matched: the most a fast tile does
    entries = block_m * block_n / (32 * warps)  # similarity entries per thread and column tile
    return {
        "tile": list(tile),
        "registers": registers,
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
        "programs_per_sm_by_registers": 65536 // (registers * 32 * warps),
        "loop_instructions": sum(loop.values()),
        "loop_exp2": loop["MUFU"],
        "loop_tensor_core": loop["HGMMA"],
        "fast_path_instructions": sum(fast.values()),
        "instructions_per_entry": round(sum(fast.values()) / entries, 2),
        "exp2_per_entry": round(fast["MUFU"] / entries, 2),
        # per entry with 0, 1, ... key sets matched on the tile (the first of these is the one above)
        "instructions_per_entry_by_sets_matched": [round(sum(p.values()) / entries, 2) for p in paths],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=json_output, help="also write the rows here")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--sets", type=int, default=2, choices=[1, 2], help="positive-key sets (P)")
    parser.add_argument(
        "--upstream", default="mean", choices=["mean", "rows"],
        help="the backward's upstream gradient: of the fused masked means (the losses' path) or per row",
    )  # fmt: skip
    args = parser.parse_args()
    dtype, rows = f"*{args.dtype}", []
    # One tower, N a multiple of the tile (EVEN_N), keys and groups shared by rows and columns.
    common = {"P": args.sets, "BLOCK_D": 128, "EVEN_D": True, "PRECISION": "tf32"}
    means = args.upstream == "mean"  # one segment of rows, as nt_xent or suncet_loss alone
    mean = {"MEAN": 1 if means else 0}
    for bounded in (True, False):
        mode = "bounded" if bounded else "running maxima"
        stats = 2 * args.sets if bounded and means else args.sets  # as triton_launch._Plan.mean_stats
        for tile in tiles.FORWARD_TABLE[128]:
            constants = {**common, "BOUNDED": bounded, "INVERSE": bounded, "STATS": stats, "CHECK_K": False,
                         "EVEN_N": True}  # fmt: skip
            rows.append({"kernel": f"forward ({mode})", **analyse(tk.forward_kernel, dtype, constants, tile)})
        for two_sides in (False, True):  # one tower; q and k apart (distributed), both sides in one kernel
            layout = "two-tower" if two_sides else "one-tower"
            for tile in tiles.backward_tiles(128, bounded):
                constants = {**common, **mean, "BOUNDED": bounded, "STATS": stats, "TWO_SIDES": two_sides,
                             "SYMMETRIC": not two_sides, "EVEN_N": True}  # fmt: skip
                result = analyse(tk.backward_kernel, dtype, constants, tile)
                rows.append({"kernel": f"{layout} backward ({mode})", **result})
    print(f"sm_90, D = 128, {args.dtype}, P = {args.sets}, backward upstream: {args.upstream}, "
          f"triton {triton.__version__}; tile = (BLOCK_M, BLOCK_N, warps, stages)")  # fmt: skip
    print(f"{'kernel':34} {'tile':18} {'regs':>5} {'spill':>6} {'progs/SM':>8} {'loop instr':>10} {'exp2':>5} "
          f"{'wgmma':>6} {'fast path':>9} {'instr/entry':>11} {'exp2/entry':>10}  instr/entry by key sets matched 0/1/..")  # fmt: skip
    for r in rows:
        print(f"{r['kernel']:34} {tuple(r['tile'])!s:18} {r['registers']:5d} {r['spill_bytes']:6d} "
              f"{r['programs_per_sm_by_registers']:8d} {r['loop_instructions']:10d} {r['loop_exp2']:5d} "
              f"{r['loop_tensor_core']:6d} {r['fast_path_instructions']:9d} {r['instructions_per_entry']:11.2f} "
              f"{r['exp2_per_entry']:10.2f}  {'/'.join(f'{x:.2f}' for x in r['instructions_per_entry_by_sets_matched'])}")  # fmt: skip
    if args.json:
        report = {"target": "sm_90", "dtype": args.dtype, "sets": args.sets, "upstream": args.upstream, "rows": rows}
        write_json(args.json, report)


if __name__ == "__main__":
    main()
