"""The `suncet` command's entry point. Stop requests are answered from its first instant, while
the command's modules and plugins still load: SIGTERM or SIGUSR1 (a scheduler) ends it with a
line and exit 75, Ctrl-C with a line and exit 130. Only the standard library and suncet's light
modules are imported before that; errors that click would print itself (an unknown command or
option) are printed as one plain line too."""

import sys

from suncet.engine.stopping import EXIT_INTERRUPTED, answer_stops_at_once
from suncet.errors import SuncetError


def _command_name(arguments: list[str]) -> str:
    words = [a for a in arguments if not a.startswith("-")]
    return f"suncet {words[0]}" if words else "suncet"


def main() -> None:
    answer_stops_at_once(_command_name(sys.argv[1:])[:60])
    code = 0
    try:
        import click

        from suncet.cli.main import main as command

        try:
            code = command.main(prog_name="suncet", standalone_mode=False)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.exceptions.Abort:
            _fail("interrupted", EXIT_INTERRUPTED)
    except SuncetError as exc:  # a stop request while the command's modules load
        _fail(str(exc), exc.exit_code, prefix=False)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(detail: str, exit_code: int, prefix: bool = True) -> None:
    try:
        from suncet.cli.main_console import fail, say
    except (KeyboardInterrupt, SuncetError):  # another stop request while the printer loads
        sys.exit(exit_code)
    if prefix:
        fail(detail, exit_code)
    say(detail)
    sys.exit(exit_code)
