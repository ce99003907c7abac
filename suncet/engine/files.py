"""Writing a run's files: whole or not at all, never through a symbolic link, disk full said plainly."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Callable

from suncet.errors import SuncetError


class DiskFullError(SuncetError):
    exit_code = 2


class WriteError(SuncetError):
    """A file suncet was asked to write that the system refuses (a read-only folder, ...)."""

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
    if getattr(exc, "errno", None) is not None:  # the system said why, and it was not a full disk
        return False
    try:  # torch.save reports a full disk as a failed stream write, without the errno
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a new temporary file beside ``path``, then rename it over ``path``: a
    crash leaves the old file whole. The temporary file gets an unpredictable name and is
    created exclusively, never through a symbolic link (a link planted beside ``path`` is
    neither followed nor removed); the rename replaces ``path`` itself, never what a link
    there points to. A full disk raises DiskFullError naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}{TEMPORARY_MARK}", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _mode_for(path))
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if _disk_full(exc, path.parent):
            raise DiskFullError(f"no space left on device while writing {path}") from None
        if isinstance(exc, OSError) and exc.strerror:  # named by the file the user knows, not the temporary one
            raise WriteError(f"cannot write {path}: {exc.strerror}") from None
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def _mode_for(path: Path) -> int:
    """The permissions a replaced file had, else those the user's umask gives a new file (what
    their other tools would create), never the temporary file's private 0600."""
    try:
        existing = os.stat(path, follow_symlinks=False)
    except OSError:
        return 0o666 & ~current_umask()
    return existing.st_mode & 0o7777 if stat.S_ISREG(existing.st_mode) else 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (another thread may be
    creating files meanwhile)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The temporary names this module and checkpoint rotation give the files they write: nothing
# else is ever removed as a leftover.
TEMPORARY_MARK = ".tmp-"
_PARTIAL_WRITE = re.compile(r"^\.(?P<name>.+)\.tmp-\w{8}$|^\.last\.pt\.link-\w{8}$")


def remove_partial_writes(directory: Path, written_by_suncet: Callable[[str], bool]) -> list[Path]:
    """Delete the temporary files of writes that a crash interrupted (call with the run's lock
    held): regular files named as ``write_atomic`` names them, for a file name that
    ``written_by_suncet`` says is one of suncet's own."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    for leftover in Path(directory).iterdir():
        match = _PARTIAL_WRITE.match(leftover.name)
        if match is None or leftover.is_symlink() or not leftover.is_file():
            continue
        if match.group("name") is None or written_by_suncet(match.group("name")):
            leftover.unlink()
            removed.append(leftover)
    return removed
