"""What reaches a terminal: text that did not come from suncet's own code is shown as text.

A method name in a run's ``config.yaml``, a folder name, a plugin's docstring or an error that
quotes a file can hold terminal escape sequences (OSC 8 links, OSC 52 clipboard writes, clear
screen), a carriage return that overwrites what was printed, bidirectional overrides, or rich
markup (``[link=...]``, ``[conceal]``, a stray ``[/b]`` that makes rich raise). ``plain`` is the
one function such a string is printed through: control and format characters become visible
escapes (``\\x1b``) and markup is never interpreted. ``Terminal`` is the console every command
prints through; it sends every string it is given through ``plain``, so suncet's own emphasis
is built with ``styled`` instead of markup.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from rich.console import Console
from rich.text import Text

# Categories shown as escapes: controls (C0, DEL, C1), format characters (bidirectional
# overrides, zero-width joiners), lone surrogates (undecodable bytes of a file name), and the
# Unicode line and paragraph separators that some terminals take for a newline.
_NEUTRALISED = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def neutralised(text: str, newlines: bool = True) -> str:
    """``text`` with every character a terminal could act on written as a visible escape; with
    ``newlines`` a line feed stays a line break (and a tab stays a tab)."""
    kept = "\n\t" if newlines else "\t"
    if text.isprintable() and (newlines or "\n" not in text):
        return text
    return "".join(
        char if char in kept or unicodedata.category(char) not in _NEUTRALISED else _escape(char) for char in text
    )


def plain(value: Any, newlines: bool = True) -> Text:
    """``value`` (anything: its ``str``) as rich text that prints exactly as written: no markup,
    no escape sequence reaches the terminal."""
    return Text(neutralised(str(value), newlines))


def styled(*parts: str | tuple[str, str] | Text) -> Text:
    """One line of suncet's own emphasis around plain text: ``styled(("error:", "red"), " ", detail)``;
    a bare string is plain text (``plain``), a (text, style) pair is suncet's own styled word, and
    a ``Text`` is one that ``plain`` or ``styled`` made."""
    line = Text()
    for part in parts:
        if isinstance(part, tuple):
            line.append(neutralised(part[0]), style=part[1])
        elif isinstance(part, Text):
            line.append_text(part)
        else:
            line.append_text(plain(part))
    return line


class Terminal(Console):
    """A rich console for which every string is plain text (``plain``): markup and emoji codes
    are never interpreted, escape sequences never written. Renderables pass through as they are;
    the tables suncet builds hold strings (made plain here) or ``styled`` text."""

    def __init__(self, **options: Any):
        super().__init__(**{"markup": False, "emoji": False, **options})

    def render_str(self, text: str, **options: Any) -> Text:
        options["markup"] = False
        options["emoji"] = False
        return super().render_str(neutralised(text), **options)


def report(text: str) -> None:
    """Print one line of progress (the default ``report`` of the engine's functions)."""
    Terminal().print(text, highlight=False, soft_wrap=True)
