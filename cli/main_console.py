"""The consoles every command prints through (stdout for results, stderr for errors), and the
one way an error reaches the user: one plain line (suncet/terminal.py)."""

import sys

from suncet.terminal import Terminal, styled

console = Terminal()
err_console = Terminal(stderr=True)


def fail(detail: str, exit_code: int) -> None:
    """Print ``error: <detail>`` as one line of plain text and exit with ``exit_code``."""
    err_console.print(
        styled(("error:", "red"), " ", " ".join(str(detail).splitlines()) or "error"), highlight=False, soft_wrap=True
    )
    sys.exit(exit_code)


def say(line: str) -> None:
    """Print one plain line to stderr (a stop request's message)."""
    err_console.print(" ".join(str(line).splitlines()), highlight=False, soft_wrap=True)
