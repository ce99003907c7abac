"""Writing a run's files: whole or not at all, never through a symbolic link, disk full said plainly."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import IO, Callable

from suncet.errors import SuncetError


class DiskFullError(SuncetError):
    exit_code = 2


def fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _disk_full(exc: BaseException, directory: Path) -> bool:
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc):
        return True
    try:  # torch.save reports a full disk as a failed stream write, without the errno
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a new temporary file beside ``path``, then rename it over ``path``: a
    crash leaves the old file whole. The temporary file is created exclusively and never
    through a symbolic link; a full disk raises DiskFullError naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if _disk_full(exc, path.parent):
            raise DiskFullError(f"no space left on device while writing {path}") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def remove_partial_writes(directory: Path) -> list[Path]:
    """Delete the temporary files of writes that a crash interrupted (call with the run's lock held)."""
    removed = []
    for pattern in (".*.tmp-*", ".*.link-*"):
        for leftover in Path(directory).glob(pattern):
            if leftover.is_file() or leftover.is_symlink():
                leftover.unlink()
                removed.append(leftover)
    return removed
