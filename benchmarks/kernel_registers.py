"""Registers, spills and main-loop SASS size of the Triton loss kernels for Hopper, without a GPU.

Compiles each tile configuration of suncet/kernels/triton_kernels.py ahead of time for sm_90
(``triton.compile`` with a ``GPUTarget``, as the JIT would specialise it: 16-byte aligned
pointers, D divisible by 16), assembles the PTX with Triton's ``ptxas`` and disassembles the
cubin with its ``nvdisasm``. Per configuration it reports the registers a thread, the spill
stores, about how many programs fit on a multiprocessor by registers (65,536 of them), and the
SASS instructions of the main loop as laid out: the longest span that ends in a branch back to
its start and holds a tensor-core product (masked path included).
Static figures: what they predict about speed is for kernel_anatomy.py to confirm on a card.

    python benchmarks/kernel_registers.py [--json FILE] [--dtype bf16] [--sets 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from suncet.kernels import triton_kernels as tk

_ALIGNED = {
    "q_ptr", "k_ptr", "row_keys_ptr", "col_keys_ptr", "row_groups_ptr", "col_groups_ptr", "partial_ptr", "loss_ptr",
    "valid_ptr", "lse_all_ptr", "lse_pos_ptr", "a_ptr", "b_ptr", "out_ptr", "grad_ptr", "D",
}  # fmt: skip
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def _types(kernel, dtype: str) -> dict[str, str]:
    ids = {name: "*i64" for name in ("row_keys_ptr", "col_keys_ptr", "row_groups_ptr", "col_groups_ptr")}
    stats = {"lse_all_ptr": "*fp32", "lse_pos_ptr": "*fp32"}
    if kernel is tk._forward_kernel:
        return {"q_ptr": dtype, "k_ptr": dtype, **ids, "partial_ptr": "*fp32", "loss_ptr": "*fp32",
                "valid_ptr": "*i1", **stats, "M": "i32", "N": "i32", "D": "i32", "self_offset": "i32",
                "scale2": "fp32"}  # fmt: skip
    return {"a_ptr": dtype, "b_ptr": dtype, "out_ptr": dtype, "grad_ptr": "*fp32", **stats, **ids,
            "A_COUNT": "i32", "B_COUNT": "i32", "D": "i32", "self_offset": "i32", "scale2": "fp32",
            "inv_tau": "fp32"}  # fmt: skip


def _main_loop(sass: str) -> collections.Counter:
    lines = sass.splitlines()
    labels = {line.strip().rstrip(":"): i for i, line in enumerate(lines) if re.match(r"^\s*\.L_x_\d+:", line)}
    best: list[str] = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i:
            body = lines[labels[target.group(1)] : i + 1]
            if any("HGMMA" in b for b in body) and len(body) > len(best):
                best = body
    return collections.Counter(m.group(1) for m in map(_INSTRUCTION.search, best) if m)


def analyse(kernel, dtype: str, constants: dict, tile: tuple[int, int, int, int]) -> dict:
    block_m, block_n, warps, stages = tile
    constants = {**constants, "BLOCK_M": block_m, "BLOCK_N": block_n}
    types = _types(kernel, dtype)
    fn = kernel.fn
    source = ASTSource(
        fn=fn,
        signature={**types, **{name: "constexpr" for name in constants}},
        constexprs=constants,
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in types if n in _ALIGNED},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        Path(ptx).write_text(compiled.asm["ptx"])
        report = subprocess.run(
            [_TOOLS / "ptxas", "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True, check=True
        ).stderr
        sass = subprocess.run([_TOOLS / "nvdisasm", "-c", cubin], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    loop = _main_loop(sass)
    return {
        "tile": list(tile),
        "registers": registers,
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
        "programs_per_sm_by_registers": 65536 // (registers * 32 * warps),
        "loop_instructions": sum(loop.values()),
        "loop_exp2": loop["MUFU"],
        "loop_tensor_core": loop["HGMMA"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--sets", type=int, default=2, choices=[1, 2], help="positive-key sets (P)")
    args = parser.parse_args()
    dtype, rows = f"*{args.dtype}", []
    common = {"P": args.sets, "BLOCK_D": 128, "EVEN_D": True, "PRECISION": "tf32"}
    for bounded in (True, False):
        mode = "bounded" if bounded else "running maxima"
        for tile in tk._FORWARD_TABLE[128]:
            row = analyse(tk._forward_kernel, dtype, {**common, "BOUNDED": bounded}, tile)
            rows.append({"kernel": f"forward ({mode})", **row})
        table = tk._BOUNDED_BACKWARD_TABLE if bounded else tk._BACKWARD_TABLE
        for tile in table[128]:
            constants = {**common, "BOUNDED": bounded, "ROW_SIDE": True, "COL_SIDE": True}
            rows.append({"kernel": f"one-tower backward ({mode})", **analyse(tk._backward_kernel, dtype, constants, tile)})
    print(f"sm_90, D = 128, {args.dtype}, P = {args.sets}, triton {triton.__version__}; tile = (BLOCK_M, BLOCK_N, warps, stages)")
    print(f"{'kernel':34} {'tile':18} {'regs':>5} {'spill':>6} {'progs/SM':>8} {'loop instr':>10} {'exp2':>5} {'wgmma':>6}")
    for r in rows:
        print(f"{r['kernel']:34} {tuple(r['tile'])!s:18} {r['registers']:5d} {r['spill_bytes']:6d} "
              f"{r['programs_per_sm_by_registers']:8d} {r['loop_instructions']:10d} {r['loop_exp2']:5d} {r['loop_tensor_core']:6d}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"target": "sm_90", "dtype": args.dtype, "sets": args.sets, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
