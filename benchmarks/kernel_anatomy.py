"""Kernel time of each Triton tile configuration of the fused loss, against tuned references.

`suncet bench kernels` times whole steps with the autotuner's choice. To tune the tables in
suncet/kernels/triton_tiles.py this script replays, as CUDA graphs (kernel time only, no
launch overhead), the forward and the backward launchers with each candidate configuration
forced in turn, beside two references on the same card and shape: cuBLAS's ``z @ z.T`` (the
GEMM floor) and PyTorch's flash attention on ``q = k = v = z`` (a tuned fused kernel doing
similar work: two N^2 D products around a row softmax). TFLOP/s count 2 N^2 D per product:
one in our forward, two in our one-tower backward, two in attention's forward, seven in its
forward + backward. Each tile runs at tau = 0.1, where the kernels take exponents relative to
the fixed bound of s (unit rows), and at tau = 0.02, where they keep running maxima; the
backward's tiles are those of its mode at that tau. Both run the losses' path: the forward with
the masked means reduced by its finishing kernel, the backward from the means' gradient. First,
the backward with its column splits forced to 1, 2, 4 and 8 against the launcher's choice.

    python benchmarks/kernel_anatomy.py --json FILE [--n 8192] [--d 128]   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
import torch.nn.functional as F

from suncet.bench import json_output
from suncet.engine.rundir import write_json
from suncet.kernels import Layout, triton_kernels, triton_launch, triton_tiles


def graph_ms(fn, replays: int = 10, repeats: int = 15) -> float:
    """Median kernel time of ``fn`` in ms, replayed from a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles and autotunes outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def forced(kernel, table: list, entry: tuple) -> None:
    """Make ``kernel`` run ``entry`` of ``table`` (autotuning off, entry first, cache cleared)."""
    triton_tiles.AUTOTUNE = False
    table.remove(entry)
    table.insert(0, entry)
    kernel.cache.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=json_output, required=True, help="where to write the rows")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=128)
    args = parser.parse_args()
    n, d = args.n, args.d
    product_tflop = 2 * n * n * d / 1e12

    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(n, d, generator=gen), dim=1).to("cuda", torch.bfloat16)
    keys = torch.stack([torch.arange(n) % (n // 2), torch.randint(0, 100, (n,), generator=gen)], 1).cuda()
    groups = torch.zeros(n, dtype=torch.long, device="cuda")
    layout = Layout.of(keys, row_groups=groups, one_tower=True)  # one segment, both key sets
    grad = torch.zeros(2, 2, device="cuda")  # upstream gradient of the means [segment, set]
    grad[0] = 1

    header = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, N = {n}, D = {d}, bf16, both key sets, "
        "kernel time (CUDA graphs); tile = (BLOCK_M, BLOCK_N, warps, stages)"
    )
    print(header)
    rows = []

    def record(name: str, ms: float, products: int) -> None:
        """Print the row and rewrite the JSON, so that a run cut short keeps what it measured."""
        rows.append({"kernel": name, "ms": ms, "tflops": products * product_tflop / (ms / 1e3)})
        print(f"{ms:8.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s  {name}", flush=True)
        write_json(args.json, {"header": header, "rows": rows})

    record("cuBLAS z @ z.T", graph_ms(lambda: z @ z.T), 1)
    leaf = z.view(1, 1, n, d).detach().requires_grad_(True)
    upstream = torch.ones_like(leaf)

    def attention_step():  # forward and backward in one capture: a backward alone would run on the forward's stream
        return torch.autograd.grad(F.scaled_dot_product_attention(leaf, leaf, leaf), leaf, upstream)

    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            with torch.no_grad():
                record(
                    "flash attention forward (q = k = v = z)",
                    graph_ms(lambda: F.scaled_dot_product_attention(leaf, leaf, leaf)),
                    2,
                )
            record("flash attention forward + backward", graph_ms(attention_step), 7)
    except RuntimeError as exc:  # a reference that cannot run here must not cost the tile rows
        print(f"flash attention reference skipped: {str(exc).splitlines()[0]}")

    # The backward's column splits first (the launcher picks them per tile to fill one wave),
    # each count forced in turn with the autotuner's tile for it; "auto" is the launcher's choice.
    for splits in (None, 1, 2, 4, 8):
        triton_kernels.backward_kernel.cache.clear()
        _, stats = triton_launch.forward_mean(z, z, layout, 0.1, splits=splits)
        backward = functools.partial(triton_launch.backward_mean, grad, z, z, layout, 0.1, stats, splits=splits)
        ms = graph_ms(backward)
        tile = ", ".join(triton_launch.last_configs())
        record(f"suncet backward (bounded, tau 0.1), column splits {splits or 'auto'}, {tile}", ms, 2)

    width = triton_tiles.width(d)
    for tau in (0.1, 0.02):
        # The losses' path: masked means in the kernels (forward + finishing kernel; one backward launch).
        forward = functools.partial(triton_launch.forward_mean, z, z, layout, tau)
        _, stats = forward()
        backward = functools.partial(triton_launch.backward_mean, grad, z, z, layout, tau, stats)
        mode = "bounded" if triton_tiles.bounded(tau) else "running maxima"
        for entry in list(triton_tiles.FORWARD_TABLE[width]):
            forced(triton_kernels.forward_kernel, triton_tiles.FORWARD_TABLE[width], entry)
            record(f"suncet forward + means ({mode}, tau {tau}), tile {entry}", graph_ms(forward), 1)
        bounded = triton_tiles.bounded_backward(tau, d)
        mode = "bounded" if bounded else "running maxima"
        table = triton_tiles.backward_tiles(d, bounded)
        for entry in list(table):
            forced(triton_kernels.backward_kernel, table, entry)
            record(f"suncet backward ({mode}, tau {tau}), tile {entry}", graph_ms(backward), 2)


if __name__ == "__main__":
    main()
