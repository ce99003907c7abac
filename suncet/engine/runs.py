"""The runs under a folder, each summarised from its files alone (no checkpoint is loaded)."""

from __future__ import annotations

import csv
import math
import os
import socket
from pathlib import Path

from suncet.config import load_yaml
from suncet.engine import rundir
from suncet.engine.state import numbered_checkpoints
from suncet.errors import ConfigError, shown

MONITORS = ("knn_top1", "linear_top1")


def find_runs(folder: Path | str) -> list[Path]:
    """Run directories (those holding config.yaml) at any depth under ``folder`` (sweeps nest them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder of runs")
    found = (path.parent for path in folder.rglob(rundir.CONFIG_FILE))
    return sorted(run for run in found if not _set_aside(run))


def _set_aside(run_dir: Path) -> bool:
    """Whether ``run_dir`` is an earlier run moved aside inside a run (rundir.move_aside)."""
    return any(part.name.startswith(rundir.REPLACED_PREFIX) and (part.parent / rundir.CONFIG_FILE).is_file()
               for part in (run_dir, *run_dir.parents))


def _alive(status: dict) -> bool:
    if status["host"] != socket.gethostname():
        return True  # another machine's process cannot be checked from here: trust its word
    try:
        os.kill(status["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _state(run_dir: Path, epochs_done: int, planned: int) -> tuple[str, str | None]:
    """(state, reason): finished, running, interrupted, failed, or not started."""
    status = rundir.read_status(run_dir)
    resumable = (run_dir / rundir.LAST_CHECKPOINT).is_file() or bool(numbered_checkpoints(run_dir / rundir.CHECKPOINTS))
    if status is None:  # a run from before status.json
        if epochs_done >= planned:
            return "finished", None
        state, reason = "interrupted", None
    elif status["state"] == "running" and not _alive(status):
        state, reason = "interrupted", "its process ended without a word (killed?)"
    else:
        state, reason = status["state"], status["reason"]
    if state == "interrupted" and not resumable:
        return "not started", reason or "no checkpoint yet"
    if state == "interrupted":
        return "interrupted, resumable", reason
    return state, reason


def _number(text: object, where: str) -> float | None:
    """A metrics cell as a finite number; empty or not finite: None (never a best value)."""
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} holds {shown(text)}, not a number") from None
    return value if math.isfinite(value) else None


def _best_and_last(rows: list[dict], column: str) -> tuple[float | None, float | None]:
    """The best finite value of a monitor and its last value (None where not finite)."""
    values = [_number(r[column], f"{rundir.METRICS_FILE} column {column}") for r in rows if r.get(column)]
    finite = [v for v in values if v is not None]
    return (max(finite) if finite else None), (values[-1] if values else None)


def _metrics(run_dir: Path) -> list[dict]:
    try:
        rows = rundir.read_metrics(run_dir)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{rundir.METRICS_FILE} cannot be read as suncet's metrics ({str(exc)[:60]})") from None
    if rows and "epoch" not in rows[0]:
        raise ConfigError(f"{rundir.METRICS_FILE} has no epoch column")
    return rows


def _epochs_done(rows: list[dict]) -> int:
    if not rows:
        return 0
    text = rows[-1]["epoch"]
    if not (isinstance(text, str) and text.isdigit()):
        raise ConfigError(f"{rundir.METRICS_FILE} ends with epoch {shown(text)}, not a whole number")
    return int(text)


def summarise(run_dir: Path) -> dict:
    """One run's line in ``suncet runs``; a damaged run is reported in its own line, never fatal
    to the listing (state "damaged", the reason naming the file)."""
    summary = {"run": str(run_dir), "method": None, "dataset": None, "labels": None, "epochs_done": None,
               "epochs": None, "state": "damaged", "reason": None, "images_per_second": None}
    for monitor in MONITORS:
        summary[f"{monitor}_best"] = summary[f"{monitor}_last"] = None
    try:
        config = load_yaml(run_dir / rundir.CONFIG_FILE)
        summary.update({k: config.get(k) for k in ("method", "dataset", "labels", "epochs")})
        if not isinstance(summary["epochs"], int) or isinstance(summary["epochs"], bool):
            raise ConfigError(f"{rundir.CONFIG_FILE} has no whole number of epochs")
        rows = _metrics(run_dir)
        summary["epochs_done"] = _epochs_done(rows)
        if rows:
            summary["images_per_second"] = _number(rows[-1].get("images_per_second"), f"{rundir.METRICS_FILE} images_per_second")
        for monitor in MONITORS:
            summary[f"{monitor}_best"], summary[f"{monitor}_last"] = _best_and_last(rows, monitor)
        summary["state"], summary["reason"] = _state(run_dir, summary["epochs_done"], summary["epochs"])
    except ConfigError as exc:
        summary["reason"] = str(exc)
    return summary
