"""A grid of training runs from a small YAML file, one run directory each, resumable.

name: digits-suncet
out: runs/sweep-digits            # run directories go here
base: {dataset: digits, probe_every: 5}
variants:                         # optional: each grid point runs once per variant
  - {suncet_weight: 0.0}
  - {label_loss: ce}
grid:                             # every combination of these config keys
  method: [simclr, swav]
  suncet_weight: [0.0, 1.0]
  labels: ["1%", "10%"]
  epochs: [50, 100]
  seed: [0, 1, 2]
compare:
  metric: linear_top1
  x: epochs
  panels: [method, labels]        # one figure and table per combination of these keys
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suncet.compare import METRICS, X_AXES
from suncet.config import config_fields, load_yaml
from suncet.engine.state import newest_loadable
from suncet.errors import ConfigError
from suncet.presets import build_config


@dataclass
class Sweep:
    name: str
    out: Path
    base: dict[str, Any]
    grid: dict[str, list]
    variants: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    metric: str = "linear_top1"
    x: str = "epochs"
    panels: list[str] = field(default_factory=list)


def load_sweep(path: Path) -> Sweep:
    data = load_yaml(path)
    unknown = sorted(set(data) - {"name", "out", "base", "variants", "grid", "compare"})
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key '{unknown[0]}'; known: name, out, base, variants, grid, compare")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: 'grid' must map config keys to non-empty lists of values")
    base = data.get("base") or {}
    variants = data.get("variants") or [{}]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ConfigError(f"{path}: 'variants' must be a list of mappings of config keys")
    known = config_fields()
    for key in [*grid, *base, *(k for v in variants for k in v)]:
        if key not in known:
            raise ConfigError(f"{path}: '{key}' is not a config key")
    compare = data.get("compare") or {}
    sweep = Sweep(
        name=str(data.get("name") or Path(path).stem),
        out=Path(data.get("out") or Path("runs") / Path(path).stem),
        base=dict(base),
        grid=dict(grid),
        variants=[dict(v) for v in variants],
        metric=compare.get("metric", "linear_top1"),
        x=compare.get("x", "epochs"),
        panels=list(compare.get("panels", [])),
    )
    if sweep.metric not in METRICS or sweep.x not in X_AXES:
        raise ConfigError(f"{path}: compare.metric must be one of {METRICS} and compare.x one of {tuple(X_AXES)}")
    for key in sweep.panels:
        if key not in grid:
            raise ConfigError(f"{path}: compare.panels names '{key}', which is not a grid key")
    # Every combination must be a valid configuration, logging the compared metric, before anything runs.
    logging_key = {"linear_top1": "probe_every", "knn_top1": "monitor_every"}[sweep.metric]
    for name, values in expand(sweep):
        if getattr(build_config(overrides=values), logging_key) == 0:
            raise ConfigError(f"{path}: run {name} does not log {sweep.metric}; set {logging_key} above 0 in base")
    return sweep


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", str(value).replace("%", "pct").replace("/", "per")) or "x"


def expand(sweep: Sweep) -> list[tuple[str, dict[str, Any]]]:
    """(run name, settings) for every variant and combination of the grid, in a stable order."""
    keys = list(sweep.grid)
    runs = []
    for variant in sweep.variants:
        for combination in itertools.product(*(sweep.grid[k] for k in keys)):
            values = {**sweep.base, **variant, **dict(zip(keys, combination))}
            runs.append((slug_of([*variant.items(), *zip(keys, combination)]), values))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise ConfigError("two grid combinations map to one run directory name; make the grid values distinct")
    return runs


def slug_of(items) -> str:
    return "-".join(f"{k.replace('_', '')}{_slug(v)}" for k, v in items)


def is_finished(run_dir: Path, epochs: int) -> bool:
    """Finished when the newest checkpoint that loads says all epochs ran."""
    found = newest_loadable(run_dir / "checkpoints")
    return found is not None and found[1]["progress"]["epoch"] >= epochs


def panel_of(values: dict[str, Any], panels: list[str]) -> tuple:
    return tuple((k, values[k]) for k in panels)
