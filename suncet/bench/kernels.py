"""Micro-benchmarks of the fused contrastive losses: every backend against PyTorch eager and
torch.compile of the reference, and against the GEMM floor: the three products a fused step
cannot avoid (q k^T forward; G k and G^T q backward, G the N x N gradient of the similarities),
timed as PyTorch runs them on the same device, dtype and threads. On the CPU the cpu backend
can be timed once per instruction-set variant (``cpu_variants``); each variant is then held to
the floor of its own instruction set: the same GEMMs in a process whose MKL is restricted to
that set (``MKL_CBWR``; a torch without MKL ignores it).

Loss kinds, on N L2-normalised rows laid out [view1; view2] with 100 classes:
  ntxent   NT-Xent (image ids as keys)
  suncet   SuNCEt (class ids as keys)
  both     NT-Xent + SuNCEt on the same rows: ONE fused pass with two key sets sharing the
           denominator; the eager/compiled baselines compute the two losses separately
  both2    the same two losses as two separate fused launches (to compare with ``both``)
Times are medians of repeated runs (CUDA events on a GPU, perf_counter on the CPU); "fwd" is
the loss alone, "bwd" the backward alone (after an untimed forward), "step" forward + backward,
"graph" the same step of a fused GPU backend captured once in a CUDA graph and replayed (no
launch overhead). Peak
extra memory is the growth over the inputs during one step: the CUDA allocator's peak on a
GPU, the process's peak resident set on the CPU (large allocations forced to mmap so that
freed memory is returned and counted again).
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from suncet import kernels
from suncet.kernels import cpu as cpu_kernels

LOSS_KINDS = ("ntxent", "suncet", "both", "both2")
BASELINES = ("reference", "compiled")  # eager and torch.compile of the reference
FUSED = ("cpu", "triton", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLASSES = 100
TAU = 0.1


@dataclass
class Result:
    n: int
    d: int
    dtype: str
    loss: str
    backend: str
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    step_ms: float | None = None
    step_graph_ms: float | None = None
    peak_extra_mib: float | None = None
    cpu_variant: str | None = None
    floor_ms: float | None = None
    step_over_floor: float | None = None
    speedup_vs_eager: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Timing and memory.


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device, setup=None) -> float:
    """Median time of ``fn`` in ms; ``setup`` (untimed) runs before each call and feeds it."""
    for _ in range(warmup):
        fn(*(() if setup is None else (setup(),)))
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            arg = () if setup is None else (setup(),)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*arg)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            arg = () if setup is None else (setup(),)
            t0 = time.perf_counter()
            fn(*arg)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _release_large_allocations() -> None:
    """Make glibc mmap every large block, so that freed N x N buffers leave the resident set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: fixed, which also stops its growth
        libc.mallopt(-1, 256 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _status_kib(field_name: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def _peak_extra_mib(step: Callable[[], object], device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set to the current one
    except OSError:
        return None
    base = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    return None if base is None or peak is None else max(0, peak - base) / 1024


def _graph_step_ms(step: Callable[[], object], repeats: int) -> float:
    """Median replay time of one captured forward + backward (no launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return _median_ms(graph.replay, repeats, 3, torch.device("cuda"))


# ---------------------------------------------------------------------------------------------
# Problems.


def _problem(n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device=device, dtype=dtype)
    ids = (torch.arange(n) % (n // 2)).to(device)
    classes = torch.randint(0, CLASSES, (n,), generator=gen).to(device)
    return z, ids, classes


def _loss_fn(
    kind: str, backend: str, ids: torch.Tensor, classes: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    groups = torch.zeros_like(ids)

    def run(z, keys):  # the masked means over the valid rows, as the losses take them
        layout = kernels.Layout.of(keys, row_groups=groups, one_tower=True)
        (mean,) = kernels.multi_positive_mean(z, None, layout, TAU, backend=backend)
        return mean.sum()

    if kind == "ntxent":
        return lambda z: run(z, ids)
    if kind == "suncet":
        return lambda z: run(z, classes)
    both_keys = torch.stack([ids, classes], 1).contiguous()
    if kind == "both":
        return lambda z: run(z, both_keys)
    if kind == "both2":
        return lambda z: run(z, ids) + run(z, classes)
    raise ValueError(f"unknown loss kind {kind!r}; choose from {', '.join(LOSS_KINDS)}")


# MKL's code-path setting that keeps its GEMMs to each CPU variant's instruction set
# (COMPATIBLE: SSE2, the generic variant's baseline).
MKL_CODE_PATH = {"avx512": "AVX512", "avx2": "AVX2", "generic": "COMPATIBLE"}


def _variant_floor_ms(n: int, d: int, dtype: str, variant: str, repeats: int, warmup: int) -> float:
    """The GEMM floor in a fresh process whose MKL runs ``variant``'s instruction set (MKL reads
    the setting once, when it starts)."""
    code = (
        "import sys, torch; from suncet.bench import kernels as kb; torch.set_num_threads(int(sys.argv[1])); "
        "z = kb._problem(int(sys.argv[2]), int(sys.argv[3]), kb.DTYPES[sys.argv[4]], torch.device('cpu'))[0]; "
        "print(kb._floor_ms(z, int(sys.argv[5]), int(sys.argv[6])))"
    )
    args = [torch.get_num_threads(), n, d, dtype, repeats, warmup]
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env={**os.environ, "MKL_CBWR": MKL_CODE_PATH[variant]},
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    )
    return float(done.stdout.strip().splitlines()[-1])


def _floor_ms(z: torch.Tensor, repeats: int, warmup: int) -> float:
    # The gradient of the similarities, N x N, made where it is used (at N = 32768 a host copy
    # would take longer than the products).
    grad = torch.empty(z.shape[0], z.shape[0], device=z.device, dtype=z.dtype).normal_()

    def three_products():
        return z @ z.T, grad @ z, grad.T @ z

    return _median_ms(three_products, repeats, warmup, z.device)


# ---------------------------------------------------------------------------------------------
# The grid.


def default_grid(device: torch.device) -> dict[str, list]:
    backends = [name for name in FUSED if _usable(name, device)] + list(BASELINES)
    sizes = [2048, 8192, 32768] if device.type == "cuda" else [2048, 8192]
    return {"n": sizes, "d": [128, 256], "dtype": ["fp32", "bf16"], "backend": backends, "loss": ["both"]}


def _usable(name: str, device: torch.device) -> bool:
    try:
        return kernels.resolve_backend(name, device) == name
    except Exception:
        return False


def measure(
    n: int,
    d: int,
    dtype: str,
    kind: str,
    backend: str,
    device: torch.device,
    repeats: int,
    warmup: int,
    cuda_graph: bool,
    cpu_variant: str | None = None,
) -> Result:
    result = Result(n=n, d=d, dtype=dtype, loss=kind, backend=backend, cpu_variant=cpu_variant)
    z0, ids, classes = _problem(n, d, DTYPES[dtype], device)
    if backend == "compiled":
        fn = torch.compile(_loss_fn(kind, "reference", ids, classes), dynamic=False)
    else:
        fn = _loss_fn(kind, backend, ids, classes)
    z = z0.detach().requires_grad_(True)

    def forward():
        with torch.no_grad():
            return fn(z)

    def step():
        return torch.autograd.grad(fn(z), z)

    try:
        result.fwd_ms = _median_ms(forward, repeats, warmup, device)
        result.bwd_ms = _median_ms(
            lambda loss: torch.autograd.grad(loss, z), repeats, warmup, device, setup=lambda: fn(z)
        )
        result.step_ms = _median_ms(step, repeats, warmup, device)
        result.peak_extra_mib = _peak_extra_mib(step, device)
        if cuda_graph and device.type == "cuda" and backend in FUSED:
            result.step_graph_ms = _graph_step_ms(step, repeats)
        if backend == "triton" and device.type == "cuda":
            from suncet.kernels import triton_launch

            result.notes += triton_launch.last_configs()  # what the autotuner chose for this shape
    except Exception as exc:  # one backend failing (out of memory, a compile error) must not stop the grid
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def run_grid(
    n: list[int],
    d: list[int],
    dtype: list[str],
    backend: list[str],
    loss: list[str],
    device: torch.device,
    repeats: int,
    warmup: int,
    cuda_graph: bool = False,
    progress: Callable[[Result], None] | None = None,
    cpu_variants: list[str] | None = None,
) -> list[Result]:
    """Every combination; the cpu backend once per name in ``cpu_variants`` (None: the one that
    runs), forced with ``cpu.set_variant`` and restored afterwards."""
    if device.type == "cpu":
        _release_large_allocations()
    if device.type == "cuda" and "triton" in backend:
        from suncet.kernels import triton_launch

        if triton_launch.fp32_precision() == "tf32":
            # The floor of a tf32 kernel is a tf32 product.
            torch.backends.cuda.matmul.allow_tf32 = True
    entries = [(name, variant) for name in backend for variant in (cpu_variants or [None] if name == "cpu" else [None])]
    results = []
    for nn in n:
        for dd in d:
            for dt in dtype:
                z, _, _ = _problem(nn, dd, DTYPES[dt], device)
                floor = _floor_ms(z, repeats, warmup)
                variant_floors = {
                    v: _variant_floor_ms(nn, dd, dt, v, repeats, warmup)
                    for v in (cpu_variants or [])
                    if "cpu" in backend
                }
                del z
                for kind in loss:
                    eager = None
                    for name, variant in entries:
                        r = _measure_variant(nn, dd, dt, kind, name, variant, device, repeats, warmup, cuda_graph)
                        r.floor_ms = floor if variant is None else variant_floors[variant]
                        if r.step_ms is not None:
                            r.step_over_floor = r.step_ms / r.floor_ms
                            if name == "reference":
                                eager = r.step_ms
                        results.append(r)
                        if progress:
                            progress(r)
                    for r in results[-len(entries) :]:
                        if eager is not None and r.step_ms is not None:
                            r.speedup_vs_eager = eager / r.step_ms
    return results


def _measure_variant(n, d, dtype, kind, backend, variant, device, repeats, warmup, cuda_graph) -> Result:
    if variant is None:
        return measure(n, d, dtype, kind, backend, device, repeats, warmup, cuda_graph)
    running = cpu_kernels.variant()
    cpu_kernels.set_variant(variant)
    try:
        return measure(n, d, dtype, kind, backend, device, repeats, warmup, cuda_graph, cpu_variant=variant)
    finally:
        cpu_kernels.set_variant(running)


def machine_info(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_variant": cpu_kernels.variant() if kernels.backend_status()["cpu"][0] else None,
        "tau": TAU,
        "classes": CLASSES,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda" and kernels.backend_status()["triton"][0]:
        from suncet.kernels import triton_launch, triton_tiles

        info["triton_fp32_precision"] = triton_launch.fp32_precision()
        info["triton_autotune"] = triton_tiles.AUTOTUNE
    info["backends"] = {name: {"usable": ok, "why": why} for name, (ok, why) in kernels.backend_status().items()}
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def as_json(results: list[Result], info: dict, command: str) -> dict:
    return {"machine": info, "command": command, "results": [asdict(r) for r in results]}
