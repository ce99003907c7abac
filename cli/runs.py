"""`suncet runs`: the runs under a folder, where each stands and what it reached."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from suncet.cli.main_console import console
from suncet.terminal import styled

STATE_STYLES = {"finished": "green", "running": "cyan", "failed": "red", "damaged": "red"}


def _pair(best, last) -> str:
    return "-" if best is None else f"{best:.4f} / {'-' if last is None else f'{last:.4f}'}"


@click.command("runs")
@click.argument("folder", type=click.Path(path_type=Path), default="runs")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of the runs instead of a table.")
def runs_command(folder, as_json):
    """List the runs under FOLDER (default: runs/): settings, progress, state and accuracies."""
    from suncet.engine.runs import find_runs, summarise

    summaries = [summarise(run_dir) for run_dir in find_runs(folder)]
    if as_json:
        click.echo(json.dumps(summaries, indent=2, allow_nan=False))
        return
    if not summaries:
        console.print(f"no runs under {folder}")
        return
    names = [str(Path(s["run"]).relative_to(folder)) for s in summaries]
    cells = [_cells(s) for s in summaries]
    # A run's name is what the user types next (--resume, eval, export): it is never cut or
    # folded. The other columns wrap in the width left; where too little is left for them, each
    # run is a name line and a line of its details.
    if console.width < max(len(n) for n in names) + 4 + MIN_DETAILS_WIDTH:
        console.print(f"runs under {folder}", style="italic")
        for name, row in zip(names, cells):
            console.print(name, soft_wrap=True)
            details = [part for column, cell in zip(COLUMNS, row) for part in (" · ", f"{column} ", cell)]
            console.print(styled("  ", *details[1:]))
        return
    table = Table(title=f"runs under {folder}")
    table.add_column("run", no_wrap=True, min_width=max(len(n) for n in names))
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("epochs", "img/s") else "left", overflow="fold")
    for name, row in zip(names, cells):
        table.add_row(name, *row)
    console.print(table)


COLUMNS = ("method", "dataset", "labels", "epochs", "state", "kNN best / last", "linear best / last", "img/s")
MIN_DETAILS_WIDTH = 64  # the other columns at their narrowest readable widths, with borders


def _cells(s: dict) -> list:
    state = styled((s["state"], STATE_STYLES.get(s["state"], "yellow")), f": {s['reason']}" if s["reason"] else "")
    return [
        s["method"] or "-",
        s["dataset"] or "-",
        s["labels"] or "-",
        f"{s['epochs_done'] if s['epochs_done'] is not None else '-'}/{s['epochs'] if s['epochs'] is not None else '-'}",
        state,
        _pair(s["knn_top1_best"], s["knn_top1_last"]),
        _pair(s["linear_top1_best"], s["linear_top1_last"]),
        "-" if s["images_per_second"] is None else f"{s['images_per_second']:,.0f}",
    ]
