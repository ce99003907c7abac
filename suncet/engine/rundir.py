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
import itertools
import json
import math
import os
import re
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from suncet import terminal
from suncet.config import TrainConfig, config_from_saved, load_yaml, to_yaml
from suncet.data.labels import LABELS_HEADER, labels_text
from suncet.engine.files import fsync_directory, remove_partial_writes, write_atomic
from suncet.engine.state import find_checkpoint
from suncet.errors import ConfigError, shown, what_is_at

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
LABELS_FILE = "labels.txt"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = Path(CHECKPOINTS) / "last.pt"
LOCK_FILE = ".lock"
STATUS_FILE = "status.json"
STATES = ("running", "finished", "interrupted", "failed")
REPLACED_PREFIX = "replaced-"
_SUNCET_FILE = re.compile(r"^(eval_\w+\.json|step-\d+\.pt|backbone[\w.-]*\.(safetensors|pt))$")


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
        write_csv(
            Path(run_dir) / METRICS_FILE, [r for r in read_metrics(run_dir) if int(r["epoch"]) <= completed_epochs]
        )


def write_run_files(run_dir: Path, config: TrainConfig, labeled: Tensor, fresh: bool) -> Path | None:
    """config.yaml and labels.txt, once the run is assembled (so its settings are valid). A fresh
    start in a directory that holds files first moves them aside (``move_aside``): an earlier
    run's checkpoints would outrank the new run's in the rotation. Returns where they went."""
    run_dir = Path(run_dir)
    aside = move_aside(run_dir) if fresh else None
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / CONFIG_FILE, to_yaml(config))
    write_text(run_dir / LABELS_FILE, labels_text(labeled, config.labels))
    return aside


def move_aside(run_dir: Path) -> Path | None:
    """Every entry of ``run_dir`` (but its lock and earlier set-aside folders) moved into a new
    ``RUN/replaced-<time>/``: a fresh start never deletes what was there. None when it was empty.
    All or nothing: an entry that cannot be moved (read-only, a mount point, a stop request
    half-way) moves the others back, and the message says where everything is."""
    run_dir = Path(run_dir)
    entries = (
        sorted(p for p in run_dir.iterdir() if p.name != LOCK_FILE and not _is_set_aside_folder(p))
        if run_dir.is_dir()
        else []
    )
    if not entries:
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in itertools.count():
        aside = run_dir / f"{REPLACED_PREFIX}{stamp}{f'-{attempt}' if attempt else ''}"
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
    moved: list[Path] = []
    try:
        for entry in entries:
            entry.rename(aside / entry.name)
            moved.append(entry)
    except BaseException as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        stuck = _move_back(moved, aside)
        if not stuck and not isinstance(exc, OSError):
            raise  # a stop request: answered as such, with every file back where it was
        if stuck:
            raise ConfigError(
                f"could not move {entries[len(moved)].name} of {run_dir} aside ({reason}), nor move back "
                f"{', '.join(p.name for p in stuck[:3])}{' ...' if len(stuck) > 3 else ''}: they are in {aside}, "
                f"the rest is still in {run_dir}; nothing was deleted"
            ) from None
        raise ConfigError(
            f"could not move {entries[len(moved)].name} of {run_dir} aside ({reason}); nothing was moved, "
            f"{run_dir} holds its files as before"
        ) from None
    fsync_directory(aside)
    fsync_directory(run_dir)
    return aside


def _move_back(moved: list[Path], aside: Path) -> list[Path]:
    """Undo a partial ``move_aside``: the entries that could not be moved back (none, normally)."""
    stuck = []
    for entry in reversed(moved):
        try:
            (aside / entry.name).rename(entry)
        except OSError:
            stuck.append(entry)
    if not stuck:
        try:
            aside.rmdir()
        except OSError:
            pass
    return stuck


_SET_ASIDE = re.compile(rf"^{REPLACED_PREFIX}\d{{8}}-\d{{6}}(-\d+)?$")


def _is_set_aside_folder(path: Path) -> bool:
    """A ``replaced-<time>`` folder that ``move_aside`` made."""
    return bool(_SET_ASIDE.match(path.name)) and path.is_dir() and not path.is_symlink()


def is_run_directory(folder: Path) -> bool:
    """Whether ``folder`` holds a suncet run, by suncet's own marks: its settings and the labels
    file suncet writes with them at the start, under the header only suncet writes. A folder of
    someone else's files that happens to hold a ``config.yaml`` is not a run. The one test of a
    run folder: starting, resuming, replacing, listing, comparing, exporting beside one."""
    folder = Path(folder)
    config, labels = folder / CONFIG_FILE, folder / LABELS_FILE
    if config.is_symlink() or labels.is_symlink() or not (config.is_file() and labels.is_file()):
        return False
    try:
        mark = LABELS_HEADER.encode()
        with open(labels, "rb") as handle:
            return handle.read(len(mark)) == mark
    except OSError:
        return False


def check_output_file(out: Path | str, overwrite: bool, flag: str, own_run: Path | None = None) -> Path:
    """A file an export or a plot may be written to, checked before any work: named, not a
    directory or a link, not an existing file unless ``overwrite``, and inside no run directory
    but the top level of ``own_run`` (never in its checkpoints, nor over its own files)."""
    if str(out).strip() in ("", "."):
        raise ConfigError(f"{flag} must name a file")
    out = Path(out)
    if out.is_symlink():
        raise ConfigError(f"{flag} {out} is a symbolic link; name a file (suncet never writes through a link)")
    if out.is_dir():
        raise ConfigError(f"{flag} {out} is a directory; name a file")
    if out.exists() and not overwrite:
        raise ConfigError(f"{flag} {out} exists; choose another file or add --overwrite to replace it")
    folder = out.absolute().parent
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"{flag} {out} cannot be written: {blocking} {what_is_at(blocking)}, not a folder")
    own = Path(own_run).absolute() if own_run is not None else None
    for ancestor in (folder, *folder.parents):
        if not is_run_directory(ancestor):
            continue
        if ancestor == own and folder == own and not (is_suncet_file(out.name) and not out.name.startswith("backbone")):
            break
        if ancestor == own:
            raise ConfigError(
                f"{flag} {out} is one of the run's own files or folders; write beside them in {own} "
                "under another name, or outside the run"
            )
        raise ConfigError(f"{flag} {out} is inside another run directory, {ancestor}; choose a file outside it")
    return out


def is_suncet_file(name: str) -> bool:
    """Whether ``name`` is a file name suncet gives a file it writes in a run or its checkpoints."""
    return name in (CONFIG_FILE, LABELS_FILE, METRICS_FILE, STATUS_FILE, "last.pt") or bool(_SUNCET_FILE.match(name))


def read_labels(run_dir: Path) -> list[int]:
    """The labeled training indices a run wrote to labels.txt."""
    text = (Path(run_dir) / LABELS_FILE).read_text(encoding="utf-8")
    return [int(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]


MAX_PID = 1 << 22  # Linux's largest process id (PID_MAX_LIMIT)
_STATUS_FIELDS = {"state": str, "reason": (str, type(None)), "pid": int, "host": str, "time": str}


def read_status(run_dir: Path) -> dict | None:
    """The run's status.json; None for a run from before suncet wrote one, a ConfigError naming
    what is wrong when it is damaged."""
    path = Path(run_dir) / STATUS_FILE
    if not path.exists():
        return None
    if not path.is_file():  # a pipe there would block the reader forever
        raise ConfigError(f"{STATUS_FILE} {what_is_at(path)}, not suncet's status file")
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{STATUS_FILE} cannot be read as JSON ({str(exc)[:60]})") from None
    if not isinstance(status, dict):
        raise ConfigError(f"{STATUS_FILE} holds no mapping")
    for name, kind in _STATUS_FIELDS.items():
        if not isinstance(status.get(name), kind) or isinstance(status.get(name), bool):
            raise ConfigError(f"{STATUS_FILE} lacks a valid '{name}'")
    if not 0 < status["pid"] <= MAX_PID:
        raise ConfigError(f"{STATUS_FILE} names process {shown(status['pid'])}, which no process can be")
    if status["state"] not in STATES:
        raise ConfigError(f"{STATUS_FILE} names state {shown(status['state'])}, not one of {', '.join(STATES)}")
    return status


def write_status(run_dir: Path, state: str, reason: str | None = None) -> None:
    """Record where the run stands. 'running' names this process, so that a later reader can tell
    a live run from one whose process was killed before it could say so."""
    first_line = reason.strip().splitlines()[0] if reason and reason.strip() else None
    write_json(
        Path(run_dir) / STATUS_FILE,
        {
            "state": state,
            "reason": first_line,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        },
    )


def owns_status(run_dir: Path) -> bool:
    """Whether this process is the one that marked the run as running."""
    try:
        status = read_status(run_dir)
    except ConfigError:
        return False
    return bool(
        status
        and status["state"] == "running"
        and status["pid"] == os.getpid()
        and status["host"] == socket.gethostname()
    )


def default_run_dir(config: TrainConfig) -> Path:
    labels = config.labels.replace("%", "pct").replace("/", "per")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.method}-{config.dataset}-{labels}-seed{config.seed}-{stamp}"


def load_run_config(run_dir: Path) -> TrainConfig:
    """The configuration a run was started with, exactly as saved (no preset applied again)."""
    path = Path(run_dir) / CONFIG_FILE
    if not is_run_directory(run_dir):
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE} and {LABELS_FILE} written by suncet)")
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
            raise ConfigError(
                f"run directory {self.path.parent} is in use by process {holder}; wait for it or choose another --out"
            ) from None
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
    # The folders suncet writes into: checkpoints, and the event files of the tensorboard logger,
    # whose writer opens its files itself.
    for folder in (run_dir / CHECKPOINTS, run_dir / "tensorboard"):
        if folder.is_dir() and not folder.is_symlink():
            entries += list(folder.iterdir())
    for entry in entries:
        if entry.is_symlink():
            raise ConfigError(f"{entry} is a symbolic link; a run directory's files must be its own (remove the link)")


def _check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    if str(run_dir) in ("", "."):
        raise ConfigError("--out must name a directory for the run (a new or empty one)")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} {what_is_at(run_dir)}; choose a new or empty directory")
    if run_dir.is_dir():
        check_own_files(run_dir)
    absolute = run_dir.absolute()
    blocking = next((p for p in absolute.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--out {run_dir} cannot be made: {blocking} {what_is_at(blocking)}, not a folder")
    host = next((p for p in absolute.parents if is_run_directory(p)), None)
    if host is not None:
        raise ConfigError(
            f"--out {run_dir} is inside another run directory, {host}; choose a folder outside it "
            "(a run moved aside or rotated there would take this one with it)"
        )
    if is_run_directory(run_dir):
        if not overwrite:
            raise ConfigError(
                f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
                "(or --resume auto) or replace it with --overwrite"
            )
    elif run_dir.is_dir() and any(p.name != LOCK_FILE and not _is_set_aside_folder(p) for p in run_dir.iterdir()):
        raise ConfigError(f"--out {run_dir} is not empty and holds no suncet run; choose a new or empty directory")


def _take(run_dir: Path, lock: bool, report: Callable[[str], None]) -> RunLock | None:
    """Lock the run directory (rank 0 only) and remove what interrupted writes left behind."""
    check_own_files(run_dir)
    if not lock or os.environ.get("RANK", "0") != "0":
        return None
    taken = RunLock(run_dir).acquire()
    for leftover in remove_partial_writes(run_dir, is_suncet_file) + remove_partial_writes(
        run_dir / CHECKPOINTS, is_suncet_file
    ):
        report(f"removed {leftover.name}, left by an interrupted write")
    return taken


def start_or_resume(
    config: TrainConfig | None,
    out: Path | str | None = None,
    resume: Path | str | None = None,
    overwrite: bool = False,
    report: Callable[[str], None] = terminal.report,
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
        if not is_run_directory(run_dir):  # not a run: refused or started exactly as a new --out
            _check_new_run_dir(run_dir, overwrite)
        taken = _take(run_dir, lock, report)
        checkpoint = None if overwrite else find_checkpoint(run_dir / CHECKPOINTS, fallback=True, report=report)
        return Start(config, run_dir, checkpoint, taken)
    if config is not None or out is not None:
        raise ConfigError("--resume RUN_DIR continues a run with its saved config; give no other settings with it")
    run_dir = Path(resume)
    if not run_dir.is_dir():
        raise ConfigError(
            f"--resume {resume}: no such run directory"
            if not run_dir.exists()
            else f"--resume {resume} {what_is_at(run_dir)}, not a run directory"
        )
    check_own_files(run_dir)
    config = load_run_config(run_dir)
    taken = _take(run_dir, lock, report)
    checkpoint = find_checkpoint(run_dir / CHECKPOINTS, fallback=False, report=report)
    if checkpoint is None:
        report(f"no checkpoint in {run_dir}: the run starts from the beginning")
    return Start(config, run_dir, checkpoint, taken)
