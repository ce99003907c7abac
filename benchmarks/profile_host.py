"""Host time of one fused-loss step: what Python, autograd and the launchers cost per step.

Two modes.

``--stub`` (any machine, no GPU): every Triton kernel of suncet/kernels/triton_kernels.py, where
the launchers of triton_launch.py look them up, is replaced by a launch that does nothing, and
the triton backend runs on small CPU tensors (TRITON_INTERPRET=1 only lets it take them; nothing
is interpreted). What remains is the host work of a step without Triton's own launch cost:
argument checks, plans, allocations, autograd. It times the fused masked-means step
(``kernels.multi_positive_mean`` and its gradient, on normalised rows and a built layout), the
same step through the loss module a training loop calls (``NTXentSuNCEtLoss`` on raw
projections), the per-row step with the masked means in PyTorch, and the launchers alone.

Default (a CUDA device): the same steps with real launches and the GPU never waited for, an
empty Triton launch and an empty PyTorch op for scale, then cProfile and torch.profiler of the
fused step.

    python benchmarks/profile_host.py --stub [--n 2048] [--d 128] [--rounds 15] [--json FILE]
    python benchmarks/profile_host.py [--json FILE]     # on a GPU; benchmarks/gpu_check.sh runs it
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import time

from suncet.bench import json_output  # imports neither torch nor triton: --stub sets the interpreter first


def _stub_kernels(module) -> int:
    """Replace every Triton kernel object of ``module`` by a launch that does nothing."""
    from triton.runtime.jit import KernelInterface

    class _Stub:
        best_config = None  # what the launcher records of an autotuned kernel

        @property
        def fn(self):  # the launcher's way past the autotuner during graph capture
            return self

        def __getitem__(self, grid):
            return _noop

    def _noop(*args, **kwargs):
        return None

    stubbed = 0
    for name, value in vars(module).copy().items():
        if isinstance(value, KernelInterface):
            setattr(module, name, _Stub())
            stubbed += 1
    return stubbed


def host_us(steps: dict, repeats: int, sync, clock, rounds: int) -> dict[str, list[float]]:
    """Per step, the mean ``clock`` time per call in microseconds in each of ``rounds`` rounds;
    the steps take turns within each round, so that a shared machine's drift touches all alike."""
    for fn in steps.values():
        for _ in range(20):
            fn()
    sync()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = clock()
            for _ in range(repeats):
                fn()
            sync()
            times[name].append((clock() - start) / repeats * 1e6)
    return times


def _machine(stub: bool):
    """(device, dtype, sync, clock, kernels stubbed) for the chosen mode."""
    import torch

    from suncet import kernels
    from suncet.kernels import triton_kernels

    if stub:
        stubbed = _stub_kernels(triton_kernels)
        device = torch.device("cpu")
        dtype = torch.float32
        # The CPU time of this one thread: on a shared machine, wall time also counts the other
        # processes' turns. One intra-op thread keeps the few CPU ops left on it.
        torch.set_num_threads(1)
        clock = time.thread_time

        def sync():
            return None
    else:
        stubbed = 0
        device = torch.device("cuda")
        dtype = torch.bfloat16
        sync = torch.cuda.synchronize
        clock = time.perf_counter
    kernels.backend_status.cache_clear()
    return device, dtype, sync, clock, stubbed


def _steps(n: int, d: int, device, dtype) -> dict:
    """The callables timed: floor, the loss module's step, the op's fused step, the per-row
    step, and the two launchers alone."""
    import torch
    import torch.nn.functional as F

    from suncet import kernels
    from suncet.kernels import triton_launch
    from suncet.losses import NTXentSuNCEtLoss

    half = n // 2  # the training layout: [unlabeled views; labeled rows], NT-Xent and SuNCEt in one launch
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_(True)
    z = F.normalize(raw.detach().float(), dim=1).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 100, (n - half,), generator=gen).to(device)
    ids = (torch.arange(half) % (half // 2)).to(device)
    groups = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(n - half, dtype=torch.long)]).to(device)
    layout = kernels.Layout.of(torch.cat([ids, labels]), row_groups=groups, one_tower=True, boundary=half)
    loss = NTXentSuNCEtLoss(0.1, backend="triton")
    out0, out1, labeled = raw[: half // 2], raw[half // 2 : half], raw[half:]

    def module_step():  # what a training loop runs: NTXentSuNCEtLoss on raw projections, and the gradient
        ntxent, suncet = loss(out0, out1, labeled, labels)
        return torch.autograd.grad(ntxent + suncet, raw)

    def fused_step():  # both losses as masked means inside the kernels, and their gradient
        ntxent, suncet = kernels.multi_positive_mean(z, None, layout, 0.1, backend="triton")
        return torch.autograd.grad(ntxent + suncet, z)

    def per_row_step():  # per-row losses, masked means in PyTorch
        loss, valid = kernels.multi_positive(z, None, layout, 0.1, backend="triton")
        ntxent, suncet = kernels.segment_means(loss, valid, layout)
        return torch.autograd.grad(ntxent + suncet, z)

    zd = z.detach()
    _, stats = triton_launch.forward_mean(zd, zd, layout, 0.1)
    grad = (torch.ones((), device=device), torch.ones((), device=device))

    def launch_forward():
        return triton_launch.forward_mean(zd, zd, layout, 0.1)

    def launch_backward():
        return triton_launch.backward_mean(grad, zd, zd, layout, 0.1, stats)

    class _Nothing(torch.autograd.Function):  # the floor: an autograd step that computes nothing
        @staticmethod
        def forward(ctx, x):
            return x.new_empty(()), x.new_empty(())

        @staticmethod
        def backward(ctx, a, b):
            return torch.empty_like(z)

    def floor_step():
        a, b = _Nothing.apply(z)
        return torch.autograd.grad(a + b, z)

    class _Saving(torch.autograd.Function):  # the floor with the op's arguments and saved tensors
        @staticmethod
        def forward(ctx, q, k, call):
            ctx.call = call
            ctx.save_for_backward(q, k, stats)
            return q.new_empty(()), q.new_empty(())

        @staticmethod
        def backward(ctx, a, b):
            q, _, _ = ctx.saved_tensors
            return torch.empty_like(q), None, None

    def saving_step():
        a, b = _Saving.apply(z, None, (layout, 0.1, "triton", True))
        return torch.autograd.grad(a + b, z)

    def function_step():  # the op's Function without the argument checks and backend resolution
        a, b = kernels.FusedContrastive.apply(z, None, (layout, 0.1, "triton", True))
        return torch.autograd.grad(a + b, z)

    return {
        FLOOR: floor_step,
        FUSED: fused_step,
        "floor with the op's three arguments, saving operands and statistics, forward + gradient": saving_step,
        "FusedContrastive alone (no argument checks), forward + gradient": function_step,
        "module step: NTXentSuNCEtLoss on raw projections (cat, normalise, labels), forward + gradient": module_step,
        "per-row step: multi_positive + PyTorch masked means, forward + gradient": per_row_step,
        "forward_mean launcher (2 launches)": launch_forward,
        "backward_mean launcher (1 launch)": launch_backward,
    }


FLOOR = "floor: an autograd.Function computing nothing, two outputs, forward + gradient"
FUSED = "fused step: multi_positive_mean (both means), forward + gradient"


def _profiles(fused_step, sync) -> str:
    """cProfile and torch.profiler of the fused step (on a GPU)."""
    import torch

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        fused_step()
    sync()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    report = f"\ncProfile of 200 fused steps, by own time:\n{text.getvalue()}"
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(50):
            fused_step()
        sync()
    report += "\ntorch.profiler of 50 fused steps, by self CPU time:\n"
    return report + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def _at_least(low: int):
    """An argparse type: an integer >= ``low``, else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"an integer is needed, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"at least {low} is needed, got {value}")
        return value

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stub", action="store_true", help="CPU tensors, Triton launches replaced by no-ops")
    parser.add_argument("--n", type=_at_least(4), default=2048, help="rows (half NT-Xent views, half labeled)")
    parser.add_argument("--d", type=_at_least(1), default=128)
    parser.add_argument("--repeats", type=_at_least(1), default=300)
    parser.add_argument("--rounds", type=_at_least(1), default=15, help="rounds of --repeats calls, the steps in turn")
    parser.add_argument("--json", type=json_output, help="also write the timings here")
    args = parser.parse_args()
    if args.stub:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: lets the backend take CPU tensors

    import torch
    import triton

    from suncet.engine.rundir import write_json

    device, dtype, sync, clock, stubbed = _machine(args.stub)
    n, d, half = args.n, args.d, args.n // 2
    steps = _steps(n, d, device, dtype)
    if not args.stub:

        @triton.jit
        def _empty_kernel(x_ptr, n):
            pass

        empty = torch.empty(1, device=device)
        steps["empty Triton launch"] = lambda: _empty_kernel[(1,)](empty, 1)
        steps["empty PyTorch op (add_)"] = lambda: empty.add_(1)
    rounds = host_us(steps, args.repeats, sync, clock, args.rounds)
    timings = {name: statistics.median(values) for name, values in rounds.items()}
    # The ratio of each round's adjacent measurements: a drifting machine moves both alike.
    ratio = statistics.median(fused / floor for fused, floor in zip(rounds[FUSED], rounds[FLOOR]))

    where = "CPU, Triton launches stubbed" if args.stub else torch.cuda.get_device_name()
    header = (
        f"{where}; {platform.processor() or platform.machine()}, Python {sys.version.split()[0]}, torch "
        f"{torch.__version__}, triton {triton.__version__}; N={n} D={d} {str(dtype).removeprefix('torch.')}, "
        f"one tower, NT-Xent on the first {half} rows and SuNCEt on the others (one key set, two groups)"
    )
    report = io.StringIO()
    measure = "CPU time of the calling thread" if args.stub else "wall time, the GPU never waited for"
    report.write(
        f"{header}\n\nhost microseconds per call ({measure}; median of {len(rounds[FLOOR])} rounds of {args.repeats}, the steps in turn):\n"
    )
    for name, us in timings.items():
        report.write(f"  {us:9.1f}  {name}\n")
    report.write(
        f"  fused step / floor: {ratio:.2f} (median of the rounds' ratios; of the medians: "
        f"{timings[FUSED] / timings[FLOOR]:.2f})\n"
    )
    if args.stub:
        report.write(f"  ({stubbed} Triton kernels stubbed)\n")
    else:
        report.write(_profiles(steps[FUSED], sync))
    print(report.getvalue())
    if args.json:
        write_json(args.json, {"header": header, "host_us": timings, "fused_over_floor": ratio, "rounds_us": rounds})


if __name__ == "__main__":
    main()
