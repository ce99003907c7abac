"""Where the host time of one fused-loss step goes, on a GPU.

On the H200 (2026-11-28) a Triton step at N = 2048 took 1.6-1.75 ms from Python against 0.21 ms
of kernel time (CUDA graph): the step is bound by host work, not by the kernels. This script
times, on the current CUDA device: an empty Triton launch (the floor), the bare launchers of the
forward and backward, the two custom ops, the eager loss step, and the step as `suncet bench
kernels` times it; then profiles the step with cProfile (Python functions) and torch.profiler
(operators).

    python benchmarks/profile_host.py    # prints the report (benchmarks/gpu_check.sh keeps it in its log)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
import triton

from suncet import kernels
from suncet.kernels import op, triton_kernels


@triton.jit
def _empty_kernel(x_ptr, n):
    pass


def host_us(fn, repeats: int = 300) -> float:
    """Mean wall time per call with the device kept busy enough never to starve (host-bound)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=128)
    args = parser.parse_args()
    device = torch.device("cuda")
    n, d = args.n, args.d
    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device, torch.bfloat16).requires_grad_(True)
    keys = torch.stack([torch.arange(n) % (n // 2), torch.randint(0, 100, (n,), generator=gen)], 1).to(device)
    groups = torch.zeros(n, dtype=torch.long, device=device)

    def mean_valid(loss, valid):
        return (loss * valid).sum(0) / valid.sum(0).clamp(min=1)

    def bench_step():
        loss = mean_valid(*kernels.multi_positive(z, z, keys, keys, groups, groups, 0, 0.1, backend="triton")).sum()
        return torch.autograd.grad(loss, z)

    def op_step():
        loss, _ = kernels.multi_positive(z, z, keys, keys, groups, groups, 0, 0.1, backend="triton")
        return torch.autograd.grad(loss, z, torch.ones_like(loss))

    zd = z.detach()
    stats = triton_kernels.forward(zd, zd, keys, keys, groups, groups, 0, 0.1, True)
    grad = torch.ones_like(stats[0])

    def launch_forward():
        return triton_kernels.forward(zd, zd, keys, keys, groups, groups, 0, 0.1, True)

    def launch_backward():
        return triton_kernels.backward(grad, zd, zd, keys, keys, groups, groups, stats[2], stats[3], 0, 0.1, True)

    def custom_ops():  # the route torch.compile traces; eager mode bypasses it (suncet/kernels/op.py)
        out = op.multi_positive_op(zd, zd, keys, keys, groups, groups, 0, 0.1, True, "triton")
        return op.multi_positive_backward_op(grad, zd, zd, keys, keys, groups, groups, out[2], out[3], 0, 0.1, True, "triton")

    empty = torch.empty(1, device=device)
    timings = {
        "empty triton launch": host_us(lambda: _empty_kernel[(1,)](empty, 1)),
        "empty torch op (add_)": host_us(lambda: empty.add_(1)),
        "forward launcher (triton_kernels.forward)": host_us(launch_forward),
        "backward launcher (triton_kernels.backward)": host_us(launch_backward),
        "forward + backward custom ops, no autograd": host_us(custom_ops),
        "loss step (MultiPositive, eager; loss, grad)": host_us(op_step),
        "bench step (mean over valid rows, sum, grad)": host_us(bench_step),
    }
    report = io.StringIO()
    report.write(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, N={n} D={d} bf16\n\n")
    report.write("host microseconds per call (mean of 300, device never waited for):\n")
    for name, us in timings.items():
        report.write(f"  {us:9.1f}  {name}\n")

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        bench_step()
    torch.cuda.synchronize()
    profiler.disable()
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(30)
        report.write(f"\ncProfile of 200 bench steps, by {key}:\n{text.getvalue()}")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            bench_step()
        torch.cuda.synchronize()
    report.write("\ntorch.profiler of 50 bench steps, by self CPU time:\n")
    report.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

    print(report.getvalue())


if __name__ == "__main__":
    main()
