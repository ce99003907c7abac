"""Checkpoints: written atomically (temporary file, fsync, rename), kept in rotation, loaded
with clear errors, and found again after a crash (the newest one that loads)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from suncet.errors import SuncetError

LAST = "last.pt"
_NUMBERED = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(SuncetError):
    pass


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` so that ``path`` holds either the old or the new checkpoint, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint holding only tensors and plain data (no pickled code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a checkpoint: {reason})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not a suncet training checkpoint")
    return state


def numbered_checkpoints(directory: Path) -> list[Path]:
    """The step-numbered checkpoints in ``directory``, oldest first."""
    if not Path(directory).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := _NUMBERED.match(p.name))]
    return [p for _, p in sorted(found)]


def save_rotating(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save ``step-<step>.pt``, point ``last.pt`` at it (a hard link, swapped in atomically),
    and delete all but the newest ``keep`` numbered checkpoints."""
    directory = Path(directory)
    path = directory / f"step-{step:09d}.pt"
    save_checkpoint(path, state)
    link = directory / f".{LAST}.link-{os.getpid()}"
    link.unlink(missing_ok=True)
    os.link(path, link)
    os.replace(link, directory / LAST)
    _fsync_directory(directory)
    for old in numbered_checkpoints(directory)[:-keep]:
        old.unlink()
    return path


def newest_loadable(directory: Path, report=None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads, skipping (and reporting) broken ones."""
    candidates = [Path(directory) / LAST] + list(reversed(numbered_checkpoints(directory)))
    for path in candidates:
        if not path.is_file():
            continue
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            if report is not None:
                report(f"skipping {exc}")
    return None
