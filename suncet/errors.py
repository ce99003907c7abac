"""Errors that reach a user as one clear line (the CLI prints them without a traceback)."""

import os
import reprlib
import stat

_SHOW = reprlib.Repr()
_SHOW.maxlevel = 2
_SHOW.maxtuple = _SHOW.maxlist = _SHOW.maxarray = _SHOW.maxdict = _SHOW.maxset = _SHOW.maxfrozenset = _SHOW.maxdeque = 4
_SHOW.maxstring, _SHOW.maxlong, _SHOW.maxother = 60, 40, 60


def shown(value: object) -> str:
    """``value`` as an error message may quote it: at most about 80 characters, however large or
    deeply shared the value is (a YAML alias bomb's repr alone would take gigabytes)."""
    text = _SHOW.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class SuncetError(Exception):
    """An error caused by the user's input or environment, explained in its message."""

    exit_code = 1


class ConfigError(SuncetError):
    """A bad option, config key, label spec or path: the run never started."""

    exit_code = 2


class CheckpointError(SuncetError):
    """A checkpoint that cannot be read, or belongs to another run or world size."""

    exit_code = 2


class NonFiniteError(SuncetError):
    """A NaN or inf where numbers must be finite: a training loss (after any allowed skips; the
    last good checkpoint is kept) or the weights a run would be evaluated with."""

    exit_code = 3


class TrainingStopped(SuncetError):
    """Training stopped on request after writing a checkpoint; ``exit_code`` tells why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def what_is_at(path: object) -> str:
    """What a path the user named turned out to be, for a message that refuses it ("does not
    exist", "is a directory", "is a named pipe", ...): never "does not exist" for what exists."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    except NotADirectoryError:
        return "does not exist (a folder on its path is a file)"
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    for test, kind in (
        (stat.S_ISDIR, "is a directory"),
        (stat.S_ISREG, "is a file"),
        (stat.S_ISFIFO, "is a named pipe"),
        (stat.S_ISSOCK, "is a socket"),
        (stat.S_ISCHR, "is a device"),
        (stat.S_ISBLK, "is a device"),
    ):
        if test(mode):
            return kind
    return "is not a file or directory"
