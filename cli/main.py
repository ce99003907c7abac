"""`suncet`: the command line. Errors print one line (a traceback only with --debug)."""

from __future__ import annotations

import sys

import click
from rich.table import Table

import suncet
from suncet.cli.main_console import console, err_console, fail, say
from suncet.errors import SuncetError, TrainingStopped
from suncet.terminal import styled


class SuncetGroup(click.Group):
    """A click group whose commands report SuncetError (and any crash) as one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if isinstance(exc, TrainingStopped):
                say(str(exc))
                sys.exit(exc.exit_code)
            code = exc.exit_code if isinstance(exc, SuncetError) else 2 if isinstance(exc, OSError) else 1
            if isinstance(exc, SuncetError):
                detail = str(exc)
            elif isinstance(exc, OSError) and exc.strerror:
                # A file the user named that cannot be used: its path and the system's reason.
                detail = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
            else:
                detail = f"{type(exc).__name__}: {exc}"
            fail(detail, code)


@click.group(cls=SuncetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(suncet.__version__, prog_name="suncet")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Contrastive semi-supervised pre-training: SimCLR / SwAV + SuNCEt."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command()
def plugins() -> None:
    """List the methods, datasets, backbones, optimizers and loggers that are installed."""
    from suncet.registry import REGISTRIES

    table = Table(title="suncet plugins")
    for column in ("kind", "name", "source package", "description"):
        table.add_column(column)
    failures = []
    for kind, registry in REGISTRIES.items():
        for info in registry.infos():
            table.add_row(kind, info.name, info.source, info.description)
        failures += registry.failures()
    console.print(table)
    for failure in failures:
        err_console.print(
            styled(
                ("warning:", "yellow"),
                f" {failure.kind} entry point '{failure.entry_point}' from package "
                f"'{failure.source}' failed to import: {failure.error}",
            ),
            highlight=False,
            soft_wrap=True,
        )


@main.command()
def doctor() -> None:
    """Versions, devices, and which kernel backends run here (and why not)."""
    import platform

    import torch

    from suncet.kernels import backend_status, resolve_backend
    from suncet.kernels.backends import RECORDS

    info = Table(title="suncet doctor", show_header=False)
    info.add_column("item")
    info.add_column("value")
    info.add_row("suncet", suncet.__version__)
    info.add_row("python", platform.python_version())
    info.add_row("torch", torch.__version__)
    info.add_row("torch CUDA build", torch.version.cuda or "no")
    try:
        import triton

        info.add_row("triton", triton.__version__)
    except ImportError:
        info.add_row("triton", "not installed")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info.add_row("CUDA devices", ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) or "none")
    info.add_row("CPU threads", str(torch.get_num_threads()))
    try:
        from suncet import _C

        info.add_row("suncet._C", ", ".join(f"{k}={v}" for k, v in _C.build_info().items()))
    except ImportError as exc:
        info.add_row("suncet._C", f"not importable: {exc}")
    console.print(info)

    backends = Table(title="kernel backends")
    backends.add_column("backend")
    backends.add_column("usable")
    backends.add_column("takes")
    backends.add_column("why")
    status = backend_status()
    for record in RECORDS:
        usable, reason = status[record.name]
        devices = "/".join(record.devices) if record.devices else "any device"
        dtypes = ", ".join(str(t).removeprefix("torch.") for t in record.dtypes) if record.dtypes else "any dtype"
        width = f", D <= {record.max_dim}" if record.max_dim else ""
        backends.add_row(
            record.name,
            styled(("yes", "green")) if usable else styled(("no", "red")),
            f"{devices}; {dtypes}{width}",
            reason,
        )
    console.print(backends)
    device = torch.device("cuda" if gpus else "cpu")
    console.print(styled("auto selects ", (resolve_backend("auto", device), "bold"), f" on {device}"))


def _register_subcommands() -> None:
    from suncet.cli.analysis import compare, sweep
    from suncet.cli.bench import bench
    from suncet.cli.evaluate import eval_command
    from suncet.cli.export import export_command
    from suncet.cli.runs import runs_command
    from suncet.cli.train import train

    main.add_command(train)
    main.add_command(eval_command)
    main.add_command(export_command)
    main.add_command(runs_command)
    main.add_command(bench)
    main.add_command(compare)
    main.add_command(sweep)


_register_subcommands()
