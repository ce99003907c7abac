"""The CPU kernels' instruction-set variants: what runs, how to force one, that no variant's
instructions reach code that runs on other processors, and that the kernels beat PyTorch eager
on this machine. Their arithmetic is checked against float64 loops per variant in
test_kernels.py (the ``cpu_variant`` fixture)."""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from suncet import kernels
from suncet.kernels import cpu
from suncet.kernels.layout import Layout

CPU_STATUS = kernels.backend_status()["cpu"]
pytestmark = pytest.mark.skipif(not CPU_STATUS[0], reason=CPU_STATUS[1])
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    # From this file's folder, so that `python -c` does not put the repository's unbuilt suncet/
    # first on the path.
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        cwd=os.path.dirname(__file__),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_best_supported_variant_runs_unless_one_is_forced():
    supported = cpu.variants()
    assert supported and supported[-1] == "generic" and set(supported) <= set(cpu.variants(False))
    if X86:
        assert cpu.variants(False) == ["avx512", "avx2", "generic"]
    assert cpu._C.build_info()["cpu_variants"] == cpu.variants(False)
    show = (
        "from suncet import _C, kernels; print(_C.build_info()['cpu_variant']); print(kernels.backend_status()['cpu'])"
    )
    # Fresh processes: the variable is read once, and this process's variant may be forced.
    best = _python(show, SUNCET_CPU_VARIANT="")
    assert best.returncode == 0 and best.stdout.splitlines()[0] == supported[0]
    assert f"{supported[0]} variant (this build: {', '.join(cpu.variants(False))})" in best.stdout
    forced = _python(show, SUNCET_CPU_VARIANT="generic")
    assert forced.returncode == 0 and forced.stdout.splitlines()[0] == "generic"
    # A variable naming nothing usable: the backend says why it cannot run (suncet doctor shows it).
    wrong = _python(show, SUNCET_CPU_VARIANT="sse9")
    assert wrong.returncode == 0
    assert f"unknown CPU kernel variant 'sse9'; this build has: {', '.join(cpu.variants(False))}" in wrong.stdout
    assert "(False, " in wrong.stdout


def test_variants_are_forced_in_process_and_refused_in_one_line():
    running = cpu.variant()
    try:
        for name in cpu.variants():
            cpu.set_variant(name)
            assert cpu.variant() == name
    finally:
        cpu.set_variant(running)
    with pytest.raises(ValueError, match="unknown CPU kernel variant 'sse9'; this build has: "):
        cpu.set_variant("sse9")
    for name in [v for v in cpu.variants(False) if v not in cpu.variants()]:
        with pytest.raises(ValueError, match=f"'{name}' needs instructions this processor lacks; it runs: "):
            cpu.set_variant(name)
    assert cpu.variant() == running


OBJDUMP = pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="reads x86-64 code with objdump")


@functools.cache
def _kernel_loops():
    """benchmarks/cpu_kernel_loops.py, the reader of the built library's code."""
    spec = importlib.util.spec_from_file_location("cpu_kernel_loops", REPO / "benchmarks" / "cpu_kernel_loops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@OBJDUMP
def test_wide_registers_appear_only_in_their_variants_code():
    # A function compiled with a variant's flags but shared with other callers (an inline
    # function of a common header, picked by the linker) would crash processors without those
    # instructions. Every function that touches AVX-512 state must belong to the avx512
    # variant, every one touching 256-bit registers to the avx2 or avx512 variant.
    wrong, seen = [], {"avx512": 0, "avx2": 0}
    avx512_state = re.compile(r"%zmm|%k[1-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|\{1to\d+\}")
    for function, instructions in _kernel_loops().disassemble(cpu._C.__file__).items():
        for _, mnemonic, operands in instructions:
            line = f"{mnemonic} {operands}"
            if avx512_state.search(line):
                seen["avx512"] += "::avx512::" in function
                if "::avx512::" not in function:
                    wrong.append((function, line))
            elif "%ymm" in line:
                seen["avx2"] += "::avx2::" in function
                if "::avx512::" not in function and "::avx2::" not in function:
                    wrong.append((function, line))
    assert not wrong, f"wide registers outside their variant: {wrong[:5]}"
    assert seen["avx512"] > 0 and seen["avx2"] > 0  # the scan did see the variants' code


@OBJDUMP
def test_no_variants_product_loop_keeps_a_vector_on_the_stack():
    # The defect the variants fixed: 64-byte vectors built for AVX2 split into register pairs and
    # the micro-kernel's accumulators spilled to the stack. Read from the built code, so the
    # avx512 variant is checked on processors that cannot run it.
    loops = _kernel_loops()
    shapes = loops.product_shapes(loops.loops(cpu._C.__file__))
    register = {"avx512": "zmm", "avx2": "ymm", "generic": "xmm"}
    assert {s["variant"] for s in shapes} == set(cpu.variants(False))
    for shape in shapes:
        assert shape["stack_operands"] == 0, shape
        assert shape["register"] == register[shape["variant"]], shape


def _step_seconds(backend: str, z: torch.Tensor, layout: Layout) -> float:
    start = time.process_time()
    x = z.clone().requires_grad_(True)
    loss, _ = kernels.multi_positive(x, None, layout, 0.1, backend)
    loss.sum().backward()
    return time.process_time() - start


def test_every_variant_is_faster_than_pytorch_eager_here():
    # A ratio on this machine, not a timing: forward + backward of NT-Xent + SuNCEt in one pass
    # against the reference backend (PyTorch eager, the same threads), interleaved, best of 3.
    gen = torch.Generator().manual_seed(0)
    rows = 1024
    z = F.normalize(torch.randn(rows, 128, generator=gen), dim=1)
    keys = torch.stack([torch.arange(rows) % (rows // 2), torch.randint(0, 100, (rows,), generator=gen)], 1)
    layout = Layout.of(keys, one_tower=True)
    running = cpu.variant()
    try:
        for name in cpu.variants():
            cpu.set_variant(name)
            fused, eager = [], []
            for _ in range(3):
                fused.append(_step_seconds("cpu", z, layout))
                eager.append(_step_seconds("reference", z, layout))
            assert min(fused) < min(eager), f"{name}: {min(fused):.4f} s against eager {min(eager):.4f} s"
    finally:
        cpu.set_variant(running)
