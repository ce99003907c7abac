"""`suncet bench`: micro-benchmarks of the fused kernels, PAWS's soft nearest neighbour and the data pipelines."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click
from rich.table import Table

from suncet.engine.rundir import write_json
from suncet.errors import ConfigError
from suncet.terminal import Terminal, styled

# Wide when written to a log or pipe, so that the figures table is not folded into slivers.
console = Terminal() if sys.stdout.isatty() else Terminal(width=220)


@click.group()
def bench() -> None:
    """Benchmarks that print a table and can write JSON."""


def _csv(kind, text: str | None) -> list | None:
    if text is None:
        return None
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise ConfigError(f"cannot read '{text}' as a comma-separated list: {exc}") from exc


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value < 100 else f"{value:.1f}"
    return str(value)


@bench.command("kernels")
@click.option("--n", "sizes", help="Rows N, comma-separated [default: 2048,8192 on CPU; 2048,8192,32768 on GPU].")
@click.option("--d", "dims", help="Embedding widths D, comma-separated [default: 128,256].")
@click.option("--dtype", "dtypes", help="Input dtypes among fp32, bf16, fp16 [default: fp32,bf16].")
@click.option(
    "--backend",
    "backends",
    help="Among cpu, triton, cuda, reference (PyTorch eager), compiled (torch.compile of the reference) "
    "[default: every usable fused backend, reference, compiled].",
)
@click.option("--loss", "losses", default="both", show_default=True, help="Among ntxent, suncet, both, both2.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--repeats", default=10, show_default=True, help="Timed runs per figure (the median is reported).")
@click.option("--warmup", default=2, show_default=True, help="Untimed runs before timing.")
@click.option("--cuda-graph", is_flag=True, help="Also time the step as a replayed CUDA graph (GPU only).")
@click.option("--fp32-precision", type=click.Choice(["tf32", "ieee"]), help="How the triton backend runs fp32 dots.")
@click.option(
    "--cpu-variant",
    "cpu_variants",
    help="Time the cpu backend once per instruction-set variant among "
    "avx512, avx2, generic (comma-separated, or 'all': every one this processor runs), each against "
    "the GEMM floor of its own instruction set [default: the one that runs].",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write all figures and the machine here.")
def kernels_command(
    sizes, dims, dtypes, backends, losses, device, repeats, warmup, cuda_graph, fp32_precision, cpu_variants, json_path
):
    """Time the fused contrastive losses against eager/compiled PyTorch and the GEMM floor."""
    import torch

    from suncet import kernels
    from suncet.bench import kernels as kb

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    dev = torch.device(device)
    if fp32_precision:
        kernels.set_fp32_precision(fp32_precision)
    chosen = _grid(dev, sizes, dims, dtypes, backends, losses)
    variants = _cpu_variants(cpu_variants, "cpu" in chosen["backend"])
    info = kb.machine_info(dev)
    console.print(
        styled(
            ("suncet bench kernels", "bold"), f" on {info['device']} (torch {info['torch']}, triton {info['triton']})"
        )
    )

    command = shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    done = []

    def save(results) -> None:
        if json_path:
            write_json(Path(json_path), kb.as_json(results, info, command))

    def progress(r):
        """Print each row as it lands and rewrite the JSON, so a run cut short keeps what it measured."""
        status = r.error or f"step {_fmt(r.step_ms)} ms"
        notes = f" ({'; '.join(r.notes)})" if r.notes else ""
        console.print(f"  N={r.n} D={r.d} {r.dtype} {r.loss} {_backend_name(r)}: {status}{notes}", highlight=False)
        done.append(r)
        save(done)

    results = kb.run_grid(
        **chosen,
        device=dev,
        repeats=repeats,
        warmup=warmup,
        cuda_graph=cuda_graph,
        progress=progress,
        cpu_variants=variants,
    )
    _print_results(results, cuda_graph, repeats)
    if json_path:
        save(results)  # now with the speedups over eager
        console.print(f"wrote {json_path}")


@bench.command("snn")
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="A,S,D,C",
    help="Anchors, supports, width, classes (repeatable) [default: digits, CIFAR-10 and ImageNet-like shapes].",
)
@click.option("--dtype", "dtypes", default="fp32", show_default=True, help="Among fp32, bf16, fp16, comma-separated.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1), help="Timed runs (median).")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the figures and the machine here.")
def snn_command(shapes, dtypes, device, repeats, warmup, json_path):
    """Time PAWS's soft nearest-neighbour product each way (GEMMs + softmax, or attention)."""
    import torch

    from suncet.bench import kernels as kb
    from suncet.bench import snn

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    dev = torch.device(device)
    chosen = [tuple(_csv(int, text)) for text in shapes] or snn.default_shapes(dev)
    if any(len(shape) != 4 or min(shape) < 1 for shape in chosen):
        raise ConfigError("--shape takes four positive integers: anchors,supports,width,classes")
    kinds = _csv(str, dtypes)
    if not kinds or any(kind not in kb.DTYPES for kind in kinds):
        raise ConfigError(f"--dtype must list some of {', '.join(kb.DTYPES)}, got '{dtypes}'")
    console.print(styled(("suncet bench snn", "bold"), f" on {kb.machine_info(dev)['device']}"))
    command = shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    done = []

    def progress(r):
        status = r.error or f"{_fmt(r.step_ms)} ms, max rel error {r.max_rel_error:.1e}"
        console.print(
            f"  A={r.anchors} S={r.supports} D={r.dim} C={r.classes} {r.dtype} {r.method}: {status}", highlight=False
        )
        done.append(r)
        if json_path:
            write_json(Path(json_path), snn.as_json(done, dev, command))

    results = snn.run(chosen, kinds, dev, repeats, warmup, progress)
    table = Table(title="soft nearest neighbour, forward + backward (median ms)")
    for column in ("A", "S", "D", "C", "dtype", "method", "step ms", "max rel error"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r.anchors),
            str(r.supports),
            str(r.dim),
            str(r.classes),
            r.dtype,
            r.method,
            r.error or _fmt(r.step_ms),
            "-" if r.max_rel_error is None else f"{r.max_rel_error:.1e}",
        )
    console.print(table)
    if json_path:
        console.print(f"wrote {json_path}")


def _grid(dev, sizes, dims, dtypes, backends, losses) -> dict[str, list]:
    """The checked grid of sizes, widths, dtypes, backends and losses (defaults per device)."""
    from suncet import kernels
    from suncet.bench import kernels as kb

    grid = kb.default_grid(dev)
    chosen = {
        "n": _csv(int, sizes) or grid["n"],
        "d": _csv(int, dims) or grid["d"],
        "dtype": _csv(str, dtypes) or grid["dtype"],
        "backend": _csv(str, backends) or grid["backend"],
        "loss": _csv(str, losses) or grid["loss"],
    }
    for name, allowed in (
        ("dtype", tuple(kb.DTYPES)),
        ("backend", (*kernels.BACKENDS, "compiled")),
        ("loss", kb.LOSS_KINDS),
    ):
        unknown = [v for v in chosen[name] if v not in allowed]
        if unknown:
            raise ConfigError(f"unknown --{name} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if any(n % 2 for n in chosen["n"]):
        raise ConfigError("--n must be even: rows are [view1; view2]")
    return chosen


def _cpu_variants(text: str | None, timing_cpu: bool) -> list[str] | None:
    """The checked --cpu-variant list (None: the variant that runs)."""
    if text is None:
        return None
    from suncet.kernels import cpu

    if not timing_cpu:
        raise ConfigError("--cpu-variant times the cpu backend, which --backend leaves out")
    supported = cpu.variants()
    names = supported if text.strip() == "all" else _csv(str, text)
    unknown = [name for name in names if name not in cpu.variants(False)]
    if not names or unknown:
        raise ConfigError(f"unknown --cpu-variant {text!r}; choose from {', '.join(cpu.variants(False))} or all")
    missing = [name for name in names if name not in supported]
    if missing:
        raise ConfigError(f"--cpu-variant {', '.join(missing)}: this processor runs only {', '.join(supported)}")
    return names


def _backend_name(r) -> str:
    return f"{r.backend} ({r.cpu_variant})" if r.cpu_variant else r.backend


def _print_results(results, cuda_graph: bool, repeats: int) -> None:
    from suncet.bench import kernels as kb

    table = Table(title=f"fused contrastive losses, tau={kb.TAU}, {kb.CLASSES} classes, median of {repeats}")
    columns = ["N", "D", "dtype", "loss", "backend", "fwd ms", "bwd ms", "step ms"]
    if cuda_graph:
        columns.append("graph ms")
    columns += ["peak extra MiB", "3 GEMMs ms", "step / 3 GEMMs", "vs eager"]
    for column in columns:
        table.add_column(column, justify="right" if column not in ("dtype", "loss", "backend") else "left")
    for r in results:
        row = [str(r.n), str(r.d), r.dtype, r.loss, _backend_name(r)]
        if r.error:
            row += ["error (below)"] + ["-"] * (len(columns) - len(row) - 1)
        else:
            row += [_fmt(r.fwd_ms), _fmt(r.bwd_ms), _fmt(r.step_ms)]
            if cuda_graph:
                row.append(_fmt(r.step_graph_ms))
            row += [_fmt(r.peak_extra_mib, 1), _fmt(r.floor_ms), _fmt(r.step_over_floor, 1)]
            row.append("-" if r.speedup_vs_eager is None else f"{r.speedup_vs_eager:.1f}x")
        table.add_row(*row)
    console.print(table)
    for r in results:
        if r.error:
            console.print(
                f"N={r.n} D={r.d} {r.dtype} {r.loss} {_backend_name(r)}: {r.error}", highlight=False, soft_wrap=True
            )


def _register_data_command() -> None:
    from suncet.bench.data import data

    bench.add_command(data)


_register_data_command()
