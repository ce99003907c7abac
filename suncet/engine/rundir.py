"""A run directory: its files, each written atomically, and where a run starts or resumes.

    RUN/config.yaml        the resolved settings (``suncet train --resume RUN`` reads them back)
    RUN/labels.txt         the labeled subset, one training index per line
    RUN/metrics.csv        one row per epoch (loss terms, lr, images/s, monitors)
    RUN/checkpoints/       step-numbered checkpoints and last.pt (engine/state.py)
    RUN/eval_<protocol>.json
    RUN/status.json        running, finished, interrupted or failed, with the one-line reason

``start_or_resume`` is the one place that decides whether a command starts a run, continues
one or refuses: ``suncet train``, ``suncet sweep`` and ``suncet.train`` all call it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from suncet.config import TrainConfig, config_from_saved, load_yaml, to_yaml
from suncet.data.labels import labels_text
from suncet.engine.files import remove_partial_writes, write_atomic
from suncet.engine.state import find_checkpoint
from suncet.errors import ConfigError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
LABELS_FILE = "labels.txt"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = Path(CHECKPOINTS) / "last.pt"
LOCK_FILE = ".lock"
STATUS_FILE = "status.json"
STATES = ("running", "finished", "interrupted", "failed")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (engine/files.py)."""
    write_atomic(path, lambda handle: handle.write(text.encode()))


def _without_nan(value: Any) -> Any:
    """JSON has no NaN: a value that is not a number (a target never reached) is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(_without_nan(data), indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row)) or ["epoch"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    write_text(path, text.getvalue())


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def last_metrics(run_dir: Path) -> dict:
    """The last metrics row, numbers as numbers ({} before the first epoch ends)."""
    rows = read_metrics(run_dir)

    def number(text: str):
        try:
            return int(text)
        except ValueError:
            return float(text) if text else None

    return {k: number(v) for k, v in rows[-1].items()} if rows else {}


def append_metrics_row(run_dir: Path, row: dict) -> None:
    write_csv(Path(run_dir) / METRICS_FILE, [*read_metrics(run_dir), row])


def truncate_metrics(run_dir: Path, completed_epochs: int) -> None:
    """Drop rows of epochs the checkpoint does not cover (written after it, then lost)."""
    if (Path(run_dir) / METRICS_FILE).exists():
        write_csv(Path(run_dir) / METRICS_FILE, [r for r in read_metrics(run_dir) if int(r["epoch"]) <= completed_epochs])


def write_run_files(run_dir: Path, config: TrainConfig, labeled: Tensor, fresh: bool) -> None:
    """config.yaml and labels.txt, once the run is assembled (so its settings are valid); a fresh
    run first removes a replaced run's checkpoints (their step numbers would outrank its own in
    the rotation), metrics and evaluations."""
    run_dir = Path(run_dir)
    if fresh:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        for replaced in [run_dir / METRICS_FILE, *run_dir.glob("eval_*.json")]:
            replaced.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / CONFIG_FILE, to_yaml(config))
    write_text(run_dir / LABELS_FILE, labels_text(labeled, config.labels))


def read_labels(run_dir: Path) -> list[int]:
    """The labeled training indices a run wrote to labels.txt."""
    text = (Path(run_dir) / LABELS_FILE).read_text(encoding="utf-8")
    return [int(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_status(run_dir: Path) -> dict | None:
    """The run's status.json (None for runs from before suncet wrote one, or an unreadable file)."""
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and status.get("state") in STATES else None


def write_status(run_dir: Path, state: str, reason: str | None = None) -> None:
    """Record where the run stands. 'running' names this process, so that a later reader can tell
    a live run from one whose process was killed before it could say so."""
    first_line = reason.strip().splitlines()[0] if reason and reason.strip() else None
    write_json(Path(run_dir) / STATUS_FILE, {
        "state": state, "reason": first_line, "pid": os.getpid(), "host": socket.gethostname(),
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
    })


def owns_status(run_dir: Path) -> bool:
    """Whether this process is the one that marked the run as running."""
    status = read_status(run_dir)
    return bool(status and status["state"] == "running" and status["pid"] == os.getpid()
                and status["host"] == socket.gethostname())


def default_run_dir(config: TrainConfig) -> Path:
    labels = config.labels.replace("%", "pct").replace("/", "per")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.method}-{config.dataset}-{labels}-seed{config.seed}-{stamp}"


def load_run_config(run_dir: Path) -> TrainConfig:
    """The configuration a run was started with, exactly as saved (no preset applied again)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return config_from_saved(load_yaml(path), path)


@dataclass
class Start:
    """Where a training command begins: its settings, its directory, the checkpoint to continue
    from (None: from the beginning), and the lock that makes the directory this process's."""

    config: TrainConfig
    run_dir: Path
    checkpoint: dict | None
    lock: RunLock | None = None


class RunLock:
    """An advisory lock (fcntl) on ``RUN/.lock``: one process trains in a run directory at a time."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.handle = None
        self.made_directory = False

    def acquire(self) -> RunLock:
        import fcntl

        self.made_directory = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        self.handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.handle.read().strip()[:20] or "another process"
            self.release()
            raise ConfigError(f"run directory {self.path.parent} is in use by process {holder}; wait for it or choose another --out") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def release(self) -> None:
        """Unlock; a directory made for a run that then wrote nothing (it failed validation) goes too."""
        if self.handle is not None:
            self.handle.close()  # closing the file releases the lock
            self.handle = None
            directory = self.path.parent
            if self.made_directory and [p.name for p in directory.iterdir()] == [LOCK_FILE]:
                self.path.unlink()
                directory.rmdir()


def check_own_files(run_dir: Path) -> None:
    """Refuse a run directory whose files are symbolic links: writing or rotating through one
    would change files outside the run."""
    run_dir = Path(run_dir)
    entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        entries += list(checkpoints.iterdir())
    for entry in entries:
        if entry.is_symlink():
            raise ConfigError(f"{entry} is a symbolic link; a run directory's files must be its own (remove the link)")


def _check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    if str(run_dir) in ("", "."):
        raise ConfigError("--out must name a directory for the run (a new or empty one)")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; choose a new or empty directory")
    if (run_dir / CONFIG_FILE).exists():
        if not overwrite:
            raise ConfigError(
                f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
                "(or --resume auto) or replace it with --overwrite"
            )
    elif run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise ConfigError(f"--out {run_dir} is not empty and holds no suncet run; choose a new or empty directory")


def _take(run_dir: Path, lock: bool, report: Callable[[str], None]) -> RunLock | None:
    """Lock the run directory (rank 0 only) and remove what interrupted writes left behind."""
    check_own_files(run_dir)
    if not lock or os.environ.get("RANK", "0") != "0":
        return None
    taken = RunLock(run_dir).acquire()
    for leftover in remove_partial_writes(run_dir) + remove_partial_writes(run_dir / CHECKPOINTS):
        report(f"removed {leftover.name}, left by an interrupted write")
    return taken


def start_or_resume(
    config: TrainConfig | None,
    out: Path | str | None = None,
    resume: Path | str | None = None,
    overwrite: bool = False,
    report: Callable[[str], None] = print,
    lock: bool = True,
) -> Start:
    """Decide how a run begins; nothing of an existing run is changed here.

    - no ``resume``: a new run of ``config`` in ``out`` (default: ``runs/<name>-<time>``), which
      must be a new or empty directory, or hold a run to replace with ``overwrite``;
    - ``resume="auto"``: continue the run of ``config`` in ``out`` from its newest loadable
      checkpoint (unreadable ones are kept as ``*.unreadable``), or start it there;
    - ``resume=RUN_DIR``: continue that run with its saved settings (``config`` must be None).

    With ``lock`` the directory is locked for this process (``Start.lock``; the caller releases it).
    """
    if resume is None:
        if config is None:
            raise ConfigError("a new run needs its settings")
        run_dir = Path(config.run_dir or default_run_dir(config)) if out is None else Path(out)
        _check_new_run_dir(run_dir, overwrite)
        return Start(config, run_dir, None, _take(run_dir, lock, report))
    if str(resume) == "auto":
        if out is None or config is None:
            raise ConfigError("--resume auto needs --out RUN_DIR: the run directory to continue or start")
        run_dir = Path(out)
        if not (run_dir / CONFIG_FILE).exists() and not (run_dir / CHECKPOINTS).exists():
            _check_new_run_dir(run_dir, overwrite)
        taken = _take(run_dir, lock, report)
        checkpoint = None if overwrite else find_checkpoint(run_dir / CHECKPOINTS, fallback=True, report=report)
        return Start(config, run_dir, checkpoint, taken)
    if config is not None or out is not None:
        raise ConfigError("--resume RUN_DIR continues a run with its saved config; give no other settings with it")
    run_dir = Path(resume)
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {resume}: no such run directory")
    check_own_files(run_dir)
    config = load_run_config(run_dir)
    taken = _take(run_dir, lock, report)
    checkpoint = find_checkpoint(run_dir / CHECKPOINTS, fallback=False, report=report)
    if checkpoint is None:
        report(f"no checkpoint in {run_dir}: the run starts from the beginning")
    return Start(config, run_dir, checkpoint, taken)
