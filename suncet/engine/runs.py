"""The runs under a folder, each summarised from its files alone (no checkpoint is loaded)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from suncet.config import load_yaml
from suncet.engine import rundir
from suncet.engine.state import numbered_checkpoints
from suncet.errors import ConfigError

MONITORS = ("knn_top1", "linear_top1")


def find_runs(folder: Path | str) -> list[Path]:
    """Run directories (those holding config.yaml) at any depth under ``folder`` (sweeps nest them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder of runs")
    return sorted(path.parent for path in folder.rglob(rundir.CONFIG_FILE))


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


def _best_and_last(rows: list[dict], column: str) -> tuple[float, float] | None:
    values = [float(r[column]) for r in rows if r.get(column)]
    return (max(values), values[-1]) if values else None


def summarise(run_dir: Path) -> dict:
    """One run's line in ``suncet runs``."""
    try:
        config = load_yaml(run_dir / rundir.CONFIG_FILE)
    except ConfigError as exc:  # one damaged run is reported in its row, not fatal to the listing
        config = {"state": "unreadable", "reason": str(exc)}
    rows = rundir.read_metrics(run_dir)
    epochs_done = int(rows[-1]["epoch"]) if rows else 0
    state, reason = config.get("state") or None, config.get("reason")
    if state is None:
        state, reason = _state(run_dir, epochs_done, int(config.get("epochs", 0)))
    summary = {
        "run": str(run_dir), "method": config.get("method"), "dataset": config.get("dataset"),
        "labels": config.get("labels"), "epochs_done": epochs_done, "epochs": config.get("epochs"),
        "state": state, "reason": reason,
        "images_per_second": float(rows[-1]["images_per_second"]) if rows and rows[-1].get("images_per_second") else None,
    }
    for monitor in MONITORS:
        best_last = _best_and_last(rows, monitor)
        summary[f"{monitor}_best"], summary[f"{monitor}_last"] = best_last or (None, None)
    return summary
