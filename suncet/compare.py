"""Learning curves of several runs: when each reaches an accuracy, and how much sooner.

A run is a directory with ``metrics.csv`` and ``config.yaml``. Runs whose configurations
differ only in their seed form a group; a group's figures are the mean and spread over seeds.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from suncet.config import load_yaml
from suncet.engine.files import write_atomic
from suncet.engine.rundir import is_run_directory
from suncet.errors import ConfigError

METRICS = ("linear_top1", "knn_top1")
X_AXES = {"epochs": "epoch", "images": "images_seen", "seconds": "train_seconds"}
# Settings that name a group in tables and legends first, in this order, when they differ.
DESCRIBING = ("method", "suncet_weight", "labels", "epochs", "dataset", "backbone", "tau", "batch_size")
# Settings that change where or how a run executes, not what it learns: runs differing only in
# these (and the seed) are seeds of one group.
NOT_RECIPE = {
    "seed",
    "run_dir",
    "device",
    "data",
    "download",
    "num_workers",
    "data_pipeline",
    "kernel",
    "backend",
    "compile",
    "sync_every",
    "checkpoint_every",
    "keep_checkpoints",
    "monitor_every",
    "probe_every",
    "final_eval",
    "deterministic",
    "loggers",
}


@dataclass
class Curve:
    run_dir: Path
    config: dict
    points: list[tuple[float, float, float, float]]  # (epoch, images, seconds, metric)

    def series(self, x: str) -> tuple[list[float], list[float]]:
        column = list(X_AXES).index(x)
        return [p[column] for p in self.points], [p[3] for p in self.points]

    @property
    def best(self) -> float:
        return max(p[3] for p in self.points)


@dataclass
class Group:
    label: str
    curves: list[Curve] = field(default_factory=list)


def load_curve(run_dir: Path, metric: str) -> Curve:
    run_dir = Path(run_dir)
    metrics, config = run_dir / "metrics.csv", run_dir / "config.yaml"
    if not is_run_directory(run_dir) or not metrics.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (needs the metrics.csv, config.yaml and labels.txt suncet writes)"
        )
    points = []
    try:
        with open(metrics, newline="", encoding="utf-8") as handle:
            for line, row in enumerate(csv.DictReader(handle), start=2):
                if row.get(metric):
                    points.append(_point(metrics, line, row, metric))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{metrics} is not a metrics file written by suncet ({str(exc)[:80]})") from None
    if not points:
        hint = " (train with --probe-every N to log it)" if metric == "linear_top1" else ""
        raise ConfigError(f"{metrics} has no {metric} values{hint}")
    settings = load_yaml(config)
    return Curve(run_dir, settings, points)


def _point(path: Path, line: int, row: dict, metric: str) -> tuple[float, float, float, float]:
    """(epoch, images, seconds, metric) of a metrics row; a missing, malformed or non-finite value
    is an error naming the file and line (a NaN must never pass for a best accuracy)."""
    try:
        values = tuple(float(row[k]) for k in ("epoch", "images_seen", "train_seconds", metric))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"{path}:{line}: expected numbers in epoch, images_seen, train_seconds and {metric}"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(
            f"{path}:{line}: {metric} or its epoch, images or seconds is not finite "
            f"({', '.join(f'{v:g}' for v in values)}): the run diverged; leave it out of the comparison"
        )
    if not 0 <= values[3] <= 1:
        raise ConfigError(f"{path}:{line}: {metric} is {values[3]:g}, not an accuracy in [0, 1]")
    return values


def crossing(xs: list[float], ys: list[float], target: float) -> float | None:
    """The first x at which the curve reaches ``target``, interpolated linearly between the
    logged points around it (None if it never does). The curve starts from its first point."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y >= target:
            if i == 0 or ys[i - 1] == y:
                return x
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (target - y0) * (x - x0) / (y - y0)
    return None


def group_runs(curves: list[Curve]) -> list[Group]:
    """Runs whose settings differ only in the seed (and how they were executed) share a group."""

    def recipe(curve: Curve) -> dict:
        return {k: v for k, v in curve.config.items() if k not in NOT_RECIPE}

    keys = sorted({k for c in curves for k in recipe(c)})
    differing = [k for k in keys if len({yaml.safe_dump(recipe(c).get(k)) for c in curves}) > 1]
    if "method" in differing and "method_options" in differing and not _options_vary_within_a_method(curves):
        differing.remove("method_options")  # each method's own options (a preset's defaults): the method names them
    varying = [k for k in DESCRIBING if k in differing] + [k for k in differing if k not in DESCRIBING]
    groups: dict[str, Group] = {}
    for curve in curves:
        key = yaml.safe_dump(recipe(curve), sort_keys=True)
        if key not in groups:
            groups[key] = Group(_describe(curve.config, varying or ["method"]))
        groups[key].curves.append(curve)
    return list(groups.values())


def _options_vary_within_a_method(curves: list[Curve]) -> bool:
    seen: dict[str, str] = {}
    for curve in curves:
        options = yaml.safe_dump(curve.config.get("method_options"), sort_keys=True)
        if seen.setdefault(str(curve.config.get("method")), options) != options:
            return True
    return False


def _label_term(config: dict) -> str:
    """The labeled term as set: '+ SuNCEt', '+ 0.5 x CE', 'no SuNCEt'."""
    weight = config.get("suncet_weight", 1.0)
    term = "CE" if config.get("label_loss") == "ce" else "SuNCEt"
    return f"no {term}" if not weight else f"+ {term}" if weight == 1 else f"+ {weight:g} x {term}"


def _describe(config: dict, keys: list[str]) -> str:
    parts = []
    for key in keys:
        value = config.get(key)
        if key in ("suncet_weight", "label_loss"):
            if _label_term(config) not in parts:
                parts.append(_label_term(config))
        elif key == "epochs":
            parts.append(f"{value} ep")
        elif key == "labels":
            parts.append(f"{value} labels")
        elif key in ("method", "dataset", "backbone"):
            parts.append(str(value))
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def slowest_best(groups: list[Group]) -> float:
    """The default target: the best accuracy of the slowest group (the one whose best, averaged
    over seeds, is lowest), taken from its weakest seed so that every run of it reaches the
    target; the other groups' speed-ups are measured there."""
    slowest = min(groups, key=lambda g: statistics.mean(c.best for c in g.curves))
    return min(c.best for c in slowest.curves)


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare_table(groups: list[Group], target: float) -> list[dict]:
    """Per group: best accuracy, and the epochs, images and seconds to reach ``target``
    (mean and spread over seeds), with the speed-up against the slowest group."""
    rows = []
    for group in groups:
        row = {"group": group.label, "runs": len(group.curves)}
        row["best"], row["best_std"] = _spread([c.best for c in group.curves])
        for x in X_AXES:
            hits = [crossing(*c.series(x), target) for c in group.curves]
            reached = [h for h in hits if h is not None]
            row[f"{x}_reached"] = f"{len(reached)}/{len(hits)}"
            row[x], row[f"{x}_std"] = _spread(reached) if len(reached) == len(hits) else (math.nan, math.nan)
        rows.append(row)
    for x in X_AXES:
        finite = [r[x] for r in rows if not math.isnan(r[x])]
        slowest = max(finite) if finite else math.nan
        for row in rows:
            row[f"{x}_speedup"] = slowest / row[x] if not math.isnan(row[x]) and row[x] > 0 else math.nan
    return rows


def per_seed_table(groups: list[Group]) -> list[dict]:
    """Seed by seed: the target is the slowest group's best in that seed; every group's epochs,
    images and seconds to reach it, and the speed-up against the slowest group."""
    slowest = min(groups, key=lambda g: statistics.mean(c.best for c in g.curves))
    by_seed = [{c.config.get("seed"): c for c in g.curves} for g in groups]
    seeds = sorted(set.intersection(*(set(b) for b in by_seed)), key=str)
    rows = []
    for seed in seeds:
        target = by_seed[groups.index(slowest)][seed].best
        reference = {x: crossing(*by_seed[groups.index(slowest)][seed].series(x), target) for x in X_AXES}
        for group, curves in zip(groups, by_seed):
            row = {"seed": seed, "group": group.label, "target": target, "best": curves[seed].best}
            for x in X_AXES:
                hit = crossing(*curves[seed].series(x), target)
                row[x] = math.nan if hit is None else hit
                row[f"{x}_speedup"] = reference[x] / hit if hit else math.nan
            rows.append(row)
    return rows


def _as_text(label: str) -> str:
    """A label from a run's settings as matplotlib shows it literally: a '$' would start
    mathtext, which a method name such as 'x$\\frac{$' makes fail when the figure is drawn."""
    return label.replace("$", r"\$")


def plot_formats() -> list[str]:
    """The file formats a figure can be written in (by its file name's suffix)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def plot_groups(groups: list[Group], metric: str, x: str, target: float, path: Path, title: str | None = None) -> None:
    """Mean curve per group with the min-max band over seeds, and the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    for group in groups:
        series = [c.series(x) for c in group.curves]
        length = min(len(s[0]) for s in series)
        xs = [statistics.mean(s[0][i] for s in series) for i in range(length)]
        ys = [[s[1][i] for s in series] for i in range(length)]
        (line,) = axes.plot(xs, [statistics.mean(v) for v in ys], label=_as_text(f"{group.label} (n={len(series)})"))
        if len(series) > 1:
            axes.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=line.get_color(), alpha=0.2)
    axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    axes.set_xlabel({"epochs": "epochs", "images": "images processed", "seconds": "training seconds"}[x])
    axes.set_ylabel({"linear_top1": "linear-probe top-1", "knn_top1": "kNN top-1"}[metric])
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    if title:
        axes.set_title(_as_text(title), fontsize=10)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        Path(path), lambda handle: figure.savefig(handle, format=Path(path).suffix.lstrip(".").lower() or "png")
    )
    plt.close(figure)
