"""Errors that reach a user as one clear line (the CLI prints them without a traceback)."""


class SuncetError(Exception):
    """An error caused by the user's input or environment, explained in its message."""

    exit_code = 1


class ConfigError(SuncetError):
    """A bad option, config key, label spec or path: the run never started."""

    exit_code = 2
