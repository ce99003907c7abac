"""`suncet export`: a run's backbone as a torchvision or timm state_dict, or as safetensors."""

from __future__ import annotations

from pathlib import Path

import click

from suncet.cli.main_console import console


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
# The formats are checked by export_backbone, which lists them in its error.
@click.option(
    "--format",
    "format_",
    default="safetensors",
    show_default=True,
    help="safetensors (any backbone, read back by suncet.load_backbone), torchvision or timm (a state_dict "
    "for that library's model).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="File to write (default: in the run directory); never inside another run directory.",
)
@click.option("--overwrite", is_flag=True, help="Replace the file if it exists.")
def export_command(run_dir, format_, out, overwrite):
    """Write the pre-trained backbone of RUN_DIR for use outside suncet."""
    from suncet.engine.export import export_backbone
    from suncet.engine.stopping import stop_at_once

    with stop_at_once("the export (nothing was written)"):
        exported = export_backbone(run_dir, format_, out, overwrite)
    console.print(f"backbone written to {exported.path}", soft_wrap=True)
    console.print(f"load it with: {exported.load_with}", highlight=False, soft_wrap=True)
