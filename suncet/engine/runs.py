"""The runs under a folder, each summarised from its files alone (no checkpoint is loaded)."""

from __future__ import annotations

import csv
import math
import os
import re
import socket
from pathlib import Path

from suncet.config import load_yaml
from suncet.engine import rundir
from suncet.engine.state import numbered_checkpoints
from suncet.errors import ConfigError, shown, what_is_at

MONITORS = ("knn_top1", "linear_top1")


def find_runs(folder: Path | str) -> list[Path]:
    """The run directories (``rundir.is_run_directory``) at any depth under ``folder`` (sweeps
    nest them), but earlier runs set aside inside a run (``RUN/replaced-<time>/``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(
            f"{folder}: no such folder of runs"
            if not folder.exists()
            else f"{folder} {what_is_at(folder)}, not a folder of runs"
        )
    found = {path.parent for path in folder.rglob(rundir.CONFIG_FILE)}
    return sorted(run for run in found if rundir.is_run_directory(run) and not _set_aside(run))


def _set_aside(run_dir: Path) -> bool:
    """Whether ``run_dir`` is an earlier run moved aside inside a run (rundir.move_aside)."""
    return any(
        part.name.startswith(rundir.REPLACED_PREFIX) and rundir.is_run_directory(part.parent)
        for part in (run_dir, *run_dir.parents)
    )


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


def _accuracy(text: str | None, where: str) -> float | None:
    """A monitor's cell: an accuracy in [0, 1]; empty or not finite: None (never a best value)."""
    value = _number(text, where)
    if value is not None and not 0 <= value <= 1:
        raise ConfigError(f"{where} holds {shown(text)}, not an accuracy in [0, 1]")
    return value


def _number(text: str | None, where: str) -> float | None:
    """A metrics cell as a finite number; empty or not finite: None."""
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} holds {shown(text)}, not a number") from None
    return value if math.isfinite(value) else None


def _epoch(text: str | None) -> int:
    if not (isinstance(text, str) and _WHOLE.fullmatch(text)):
        raise ConfigError(f"{rundir.METRICS_FILE} ends with epoch {shown(text)}, not a whole number")
    return int(text)


_WHOLE = re.compile(r"[0-9]{1,18}")


def _read_metrics(run_dir: Path, summary: dict) -> None:
    """Epochs done, the last images per second, and each monitor's best and last value, read in
    one pass that keeps a row at a time (a metrics file of any size costs its reading time only)."""
    path = run_dir / rundir.METRICS_FILE
    if not path.exists():
        summary["epochs_done"] = 0
        return
    if not path.is_file():
        raise ConfigError(f"{rundir.METRICS_FILE} is not a regular file")
    last: dict | None = None
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = csv.DictReader(handle)
            if rows.fieldnames is not None and "epoch" not in rows.fieldnames:
                raise ConfigError(f"{rundir.METRICS_FILE} has no epoch column")
            for row in rows:
                for monitor in MONITORS:
                    if row.get(monitor):
                        value = _accuracy(row[monitor], f"{rundir.METRICS_FILE} column {monitor}")
                        best = summary[f"{monitor}_best"]
                        if value is not None and (best is None or value > best):
                            summary[f"{monitor}_best"] = value
                        summary[f"{monitor}_last"] = value
                last = row
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{rundir.METRICS_FILE} cannot be read as suncet's metrics ({str(exc)[:60]})") from None
    summary["epochs_done"] = _epoch(last["epoch"]) if last is not None else 0
    if last is not None:
        summary["images_per_second"] = _number(
            last.get("images_per_second"), f"{rundir.METRICS_FILE} images_per_second"
        )


def _settings(run_dir: Path, summary: dict) -> None:
    config = load_yaml(run_dir / rundir.CONFIG_FILE)
    for key in ("method", "dataset", "labels"):
        if not isinstance(config.get(key), str):
            raise ConfigError(f"{rundir.CONFIG_FILE} names {key} {shown(config.get(key))}, not a name")
        summary[key] = config[key]
    epochs = config.get("epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs < 10**18:
        raise ConfigError(f"{rundir.CONFIG_FILE} has no whole number of epochs (it says {shown(epochs)})")
    summary["epochs"] = epochs


def summarise(run_dir: Path) -> dict:
    """One run's line in ``suncet runs``, from its files alone. A damaged run (whatever its files
    hold or however they fail to read) is reported in its own line, state "damaged" with the
    reason naming the file, never fatal to the listing; every value is plain JSON data."""
    summary = {
        "run": str(run_dir),
        "method": None,
        "dataset": None,
        "labels": None,
        "epochs_done": None,
        "epochs": None,
        "state": "damaged",
        "reason": None,
        "images_per_second": None,
    }
    for monitor in MONITORS:
        summary[f"{monitor}_best"] = summary[f"{monitor}_last"] = None
    try:
        _settings(run_dir, summary)
        _read_metrics(run_dir, summary)
        summary["state"], summary["reason"] = _state(run_dir, summary["epochs_done"], summary["epochs"])
    except ConfigError as exc:
        summary["reason"] = str(exc)
    except OSError as exc:
        summary["reason"] = (
            f"{Path(exc.filename).name if exc.filename else 'a file'} cannot be read ({exc.strerror or exc})"
        )
    return summary
