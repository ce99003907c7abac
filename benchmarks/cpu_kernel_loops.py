"""Inner loops of the CPU kernels per instruction-set variant, read from the built extension.

Disassembles the installed ``suncet._C`` (``objdump -d``), so it sees each variant exactly as
CMakeLists.txt built it, including the ones this processor cannot run (an AVX2-only machine
still holds the avx512 code). For every innermost loop of a variant's fp32 kernels it counts the
instructions of one iteration, the vector FMAs (or multiplies and adds, for SSE2), the vector
loads and broadcasts, and the operands on the stack (``%rsp``/``%rbp``): where the register
blocking outgrows the register file, the accumulators spill and show up there. Loops are of two
kinds: per-entry loops (the exponentials and gradient coefficients, O(N^2): each holds the
exponential's float-to-integer conversion) and product loops (multiply-adds, no conversion, no
call: the q k^T, G k and G^T q products that make up the O(N^2 D) work). Static figures: what they predict about speed is for
``suncet bench kernels --cpu-variant`` to confirm on a machine that runs the variant.

    python benchmarks/cpu_kernel_loops.py [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys

from rich.console import Console
from rich.table import Table

from suncet import _C
from suncet.bench import json_output
from suncet.engine.rundir import write_json

_FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
_INSTRUCTION = re.compile(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$")
_JUMP_TARGET = re.compile(r"^([0-9a-f]+) <")
_VARIANT = re.compile(r"suncet::cpu::(\w+)::")
_KERNEL = re.compile(
    r"::(forward|backward|gradient_pass|micro_similarity|similarity_tile|micro_accumulate|accumulate_tile)<float"
)
_STACK = re.compile(r"\(%r[sb]p[,)]")
_VECTOR_REGISTER = re.compile(r"%([xyz])mm\d+")
_PRODUCT = re.compile(r"^v?(fn?madd\w*|mulp[sd]|addp[sd])$")
_LOAD = re.compile(r"^v?mov([ua]p[sd]|dq[ua](8|16|32|64)?|s[sd])$")
_BROADCAST = re.compile(r"^vbroadcasts[sd]$|^vpbroadcast|^shufps$")
_EXPONENTIAL = re.compile(r"^v?cvttp[sd]2dq$")


def disassemble(path: str) -> dict[str, list[tuple[int, str, str]]]:
    """Every function of the library at ``path``, as its instructions (address, mnemonic, operands)."""
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", path], capture_output=True, text=True, check=True
    ).stdout
    functions: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in listing.splitlines():
        header = _FUNCTION.match(line)
        if header:
            current = header.group(1)
            functions[current] = []
            continue
        instruction = _INSTRUCTION.match(line) if current else None
        if instruction:
            functions[current].append((int(instruction.group(1), 16), instruction.group(2), instruction.group(3)))
    return functions


def _innermost_loops(instructions):
    """Spans [start, end] of the function's instructions closed by a backward jump, holding no other."""
    index = {address: i for i, (address, _, _) in enumerate(instructions)}
    spans = []
    for i, (_, mnemonic, operands) in enumerate(instructions):
        target = _JUMP_TARGET.match(operands) if mnemonic.startswith("j") else None
        if target and int(target.group(1), 16) in index and index[int(target.group(1), 16)] <= i:
            spans.append((index[int(target.group(1), 16)], i))
    return [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]


def _short_name(function: str) -> str:
    name = re.sub(r"\(anonymous namespace\)::|suncet::cpu::\w+::|^void ", "", function)
    name = re.sub(r"\(.*", "", name)
    return name + (" (omp)" if "_omp_fn" in function else "")


def loops(path: str) -> list[dict]:
    rows = []
    for function, instructions in disassemble(path).items():
        if not (_VARIANT.search(function) and _KERNEL.search(function)):
            continue
        for start, end in _innermost_loops(instructions):
            body = instructions[start : end + 1]
            mnemonics = [m for _, m, _ in body]
            products = sum(1 for m in mnemonics if _PRODUCT.match(m))
            if any(_EXPONENTIAL.match(m) for m in mnemonics):
                kind = "per-entry"
            elif products >= 2 and "call" not in mnemonics:
                kind = "product"
            else:
                continue
            widths = {w for _, _, ops in body for w in _VECTOR_REGISTER.findall(ops)}
            broadcasts = sum(1 for _, m, ops in body if _BROADCAST.match(m) or "{1to" in ops)
            rows.append({
                "variant": _VARIANT.search(function).group(1),
                "function": _short_name(function),
                "kind": kind,
                "instructions": len(body),
                "fma_or_mul_add": products,
                "vector_loads": sum(1 for _, m, ops in body if _LOAD.match(m) and "(" in ops.split(",")[0]),
                "broadcasts": broadcasts,
                "stack_operands": sum(1 for _, _, ops in body if _STACK.search(ops) and _VECTOR_REGISTER.search(ops)),
                "register": max(widths, key="xyz".index) + "mm" if widths else "",
            })  # fmt: skip
    return rows


_SHAPE = ("register", "instructions", "fma_or_mul_add", "vector_loads", "broadcasts", "stack_operands")


def product_shapes(rows: list[dict]) -> list[dict]:
    """The distinct product loops of each variant (one micro-kernel is inlined into several functions)."""
    shapes = collections.defaultdict(list)
    for row in rows:
        if row["kind"] == "product":
            shapes[(row["variant"],) + tuple(row[key] for key in _SHAPE)].append(row["function"])
    return [
        {"variant": key[0], **dict(zip(_SHAPE, key[1:])), "functions": sorted(set(functions))}
        for key, functions in sorted(shapes.items(), key=lambda item: (item[0][0], -item[0][3]))
    ]


def per_entry_summary(rows: list[dict]) -> list[dict]:
    variants = collections.defaultdict(list)
    for row in rows:
        if row["kind"] == "per-entry":
            variants[row["variant"]].append(row)
    return [
        {"variant": variant, "loops": len(members),
         "loops_with_stack_operands": sum(1 for r in members if r["stack_operands"]),
         "most_stack_operands": max(r["stack_operands"] for r in members),
         "longest_loop": max(members, key=lambda r: r["instructions"])}
        for variant, members in sorted(variants.items())
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=json_output, help="also write the loops and both summaries to this file")
    args = parser.parse_args()
    if shutil.which("objdump") is None:
        print("error: objdump (GNU binutils) is needed to read the extension's code", file=sys.stderr)
        return 2
    rows = loops(_C.__file__)
    shapes, per_entry = product_shapes(rows), per_entry_summary(rows)
    console = Console()
    products = Table(title=f"Product loops, fp32, one iteration (this processor runs {_C.cpu_variant()})")
    for column in ("variant", "reg", "instructions", "FMA (mul+add)", "loads", "broadcasts", "stack operands",
                   "in"):  # fmt: skip
        products.add_column(column)
    for s in shapes:
        products.add_row(s["variant"], s["register"], str(s["instructions"]), str(s["fma_or_mul_add"]),
                         str(s["vector_loads"]), str(s["broadcasts"]), str(s["stack_operands"]),
                         ", ".join(s["functions"]))  # fmt: skip
    console.print(products)
    entries = Table(title="Per-entry loops (exponentials, gradient coefficients), fp32")
    for column in ("variant", "loops", "with stack operands", "most stack operands", "longest loop (instructions)"):
        entries.add_column(column)
    for s in per_entry:
        longest = s["longest_loop"]
        entries.add_row(s["variant"], str(s["loops"]), str(s["loops_with_stack_operands"]),
                        str(s["most_stack_operands"]), f"{longest['function']} ({longest['instructions']})")  # fmt: skip
    console.print(entries)
    if args.json:
        write_json(args.json, {"extension": _C.__file__, "build": _C.build_info(), "product_loops": shapes,
                               "per_entry_loops": per_entry, "loops": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
