"""`suncet compare` and `suncet sweep`: learning curves, crossing points, and grids of runs."""

from __future__ import annotations

import math
from pathlib import Path

import click
from rich.table import Table

from suncet.cli.main_console import console
from suncet.compare import METRICS, X_AXES
from suncet.engine.rundir import write_json
from suncet.errors import shown


def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "not reached"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


def report(
    run_dirs: list[Path],
    metric: str,
    x: str,
    target: float | None,
    plot: Path | None,
    json_path: Path | None,
    title: str | None = None,
) -> dict:
    from suncet.compare import compare_table, group_runs, load_curve, per_seed_table, plot_groups, slowest_best

    named = {}
    for run_dir in run_dirs:  # the same run named twice (or by two paths) counts once
        named.setdefault(Path(run_dir).resolve(), run_dir)
    groups = group_runs([load_curve(d, metric) for d in named.values()])
    if target is None:
        target = slowest_best(groups)
    rows = compare_table(groups, target)
    table = Table(title=title or f"{metric}: reaching {target:.4f}")
    for column in ("group", "runs", "best", "epochs", "images", "seconds", "speed-up ep/img/s"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for row in rows:
        speedups = "/".join("-" if math.isnan(row[f"{a}_speedup"]) else f"{row[f'{a}_speedup']:.2f}x" for a in X_AXES)
        table.add_row(
            row["group"],
            str(row["runs"]),
            _fmt(row["best"], row["best_std"], 4),
            _fmt(row["epochs"], row["epochs_std"], 1),
            _fmt(row["images"], row["images_std"], 0),
            _fmt(row["seconds"], row["seconds_std"], 1),
            speedups,
        )
    console.print(table)
    seeds = per_seed_table(groups)
    if len({r["seed"] for r in seeds}) > 1:
        paired = Table(title="seed by seed: reaching the slowest group's best of that seed")
        for column in ("seed", "group", "target", "best", "epochs", "images", "seconds", "speed-up ep/img/s"):
            paired.add_column(column, justify="left" if column == "group" else "right")
        for row in seeds:
            speedups = "/".join(
                "-" if math.isnan(row[f"{a}_speedup"]) else f"{row[f'{a}_speedup']:.2f}x" for a in X_AXES
            )
            paired.add_row(
                str(row["seed"]),
                row["group"],
                f"{row['target']:.4f}",
                f"{row['best']:.4f}",
                _fmt(row["epochs"], 0, 1),
                _fmt(row["images"], 0, 0),
                _fmt(row["seconds"], 0, 1),
                speedups,
            )
        console.print(paired)
    if plot is not None:
        plot_groups(groups, metric, x, target, plot, title)
        console.print(f"figure written to {plot}")
    for row, group in zip(rows, groups):
        row["run_dirs"] = [str(c.run_dir) for c in group.curves]
    result = {"metric": metric, "x": x, "target": target, "groups": rows, "per_seed": seeds}
    if json_path is not None:
        write_json(json_path, result)
    return result


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--metric", type=click.Choice(METRICS), default="knn_top1", show_default=True)
@click.option("--x", "x_axis", type=click.Choice(list(X_AXES)), default="epochs", show_default=True)
@click.option("--target", type=click.FloatRange(0, 1), help="Accuracy to reach (default: the best of the slowest run).")
@click.option("--plot", type=click.Path(path_type=Path), help="Write the learning curves to this PNG file.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the table as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace the --plot or --json file if it exists.")
def compare(run_dirs, metric, x_axis, target, plot, json_path, overwrite):
    """Learning curves of runs, and the epochs, images and seconds each needs to reach an accuracy.

    Runs that differ only in their seed are grouped (mean ± standard deviation); a run named
    twice counts once. The files written go outside every run directory.
    """
    from suncet.compare import plot_formats
    from suncet.engine.rundir import check_output_file

    if target is not None and not math.isfinite(target):
        raise click.BadParameter(f"must be an accuracy in [0, 1], got {target}", param_hint="--target")
    for path, flag in ((plot, "--plot"), (json_path, "--json")):
        if path is not None:
            check_output_file(path, overwrite, flag)
    suffix = plot.suffix.lstrip(".").lower() if plot is not None else ""
    if suffix and suffix not in plot_formats():
        raise click.BadParameter(
            f"{plot} names no figure format (its suffix is one of {', '.join(plot_formats())}, or none for png)",
            param_hint="--plot",
        )
    report(list(run_dirs), metric, x_axis, target, plot, json_path)


@click.command()
@click.argument("sweep_file", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="List the runs and whether each is done, then stop.")
@click.option("--shard", help="I/N: run only every N-th run starting at the I-th (for N sweep processes in parallel).")
def sweep(sweep_file, dry_run, shard):
    """Run a grid of trainings from a YAML file (skipping finished runs), then compare them.

    The comparison (figures, tables, summary.json in the sweep's out directory) is made once
    every run of the grid is finished.
    """
    from suncet.engine.api import run_start
    from suncet.engine.rundir import start_or_resume
    from suncet.presets import build_config, given_keys
    from suncet.sweep import expand, is_finished, load_sweep, panel_of, slug_of

    spec = load_sweep(sweep_file)
    runs = expand(spec)
    part, parts = _parse_shard(shard)
    console.print(f"sweep {spec.name}: {len(runs)} runs in {spec.out}")
    unfinished = 0
    for index, (name, values) in enumerate(runs, start=1):
        run_dir = spec.out / name
        config = build_config(overrides={**values, "final_eval": "none"})
        done = is_finished(run_dir, config.epochs)
        mine = (index - 1) % parts == part
        console.print(f"[{index}/{len(runs)}] {name}: {'done' if done else 'to run' if mine else 'another shard'}")
        if done or dry_run or not mine:
            unfinished += not done
            continue
        run_start(start_or_resume(config, run_dir, "auto", report=console.print), console, given_keys(overrides=values))
    if dry_run or unfinished:
        if unfinished and not dry_run:
            console.print(f"{unfinished} run(s) of other shards are not finished: compare when they are")
        return
    panels: dict[tuple, list[Path]] = {}
    for name, values in runs:
        panels.setdefault(panel_of(values, spec.panels), []).append(spec.out / name)
    summary = []
    for panel, dirs in panels.items():
        label = " ".join(f"{k}={v}" for k, v in panel) or spec.name
        stem = slug_of(panel) or "all"
        result = report(dirs, spec.metric, spec.x, None, spec.out / f"compare-{stem}.png", None, title=label)
        summary.append({"panel": dict(panel), **result})
    write_json(spec.out / "summary.json", summary)
    console.print(f"summary written to {spec.out / 'summary.json'}")


def _parse_shard(shard: str | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    try:
        index, count = (int(v) for v in shard.split("/"))
    except ValueError:
        index = count = 0
    if not 1 <= index <= count:
        raise click.BadParameter(f"expected I/N with 1 <= I <= N, got {shown(shard)}", param_hint="--shard")
    return index - 1, count
