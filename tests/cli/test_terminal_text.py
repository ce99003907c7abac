"""What reaches a terminal: text from a run's files, folder names, plugins and error messages is
printed as text (suncet/terminal.py), whatever escape sequences or rich markup it holds; and
`suncet runs` lists every run, damaged or not, with whole names and valid JSON."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import SUNCET, TINY_RUN, install_fake_distribution
from rich.table import Table

from suncet.cli.main import main
from suncet.terminal import Terminal, neutralised, styled

# What a hostile file or folder name can hold, and what must never reach the terminal from it.
HOSTILE = {
    "osc52 clipboard write": "simclr\x1b]52;c;cm0gLXJmIH4K\x07",
    "osc8 link": "\x1b]8;;https://evil.example\x1b\\simclr\x1b]8;;\x1b\\",
    "clear screen": "\x1b[2J\x1b[Hsimclr",
    "c1 csi": "simclr\x9b2J",
    "carriage return": "evil\rsimclr",
    "bidi override": "simclr\u202etxt.exe",
    "line separator": "sim\u2028clr",
    "rich link markup": "[link=https://evil.example]simclr[/link]",
    "rich conceal": "[conceal]simclr[/conceal]",
    "stray closing tag": "simclr[/b]",
    "emoji code": "simclr :warning:",
}
NEVER = ("\x1b", "\x07", "\x9b", "\r", "\u202e", "\u2028")


def rendered(*objects, width: int = 200) -> str:
    console = Terminal(file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor")
    for obj in objects:
        console.print(obj)
    return console.file.getvalue()


def visible(text: str) -> str:
    """``text`` without the styles suncet itself asked for (its own SGR sequences)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize("name", HOSTILE)
def test_a_string_is_printed_as_text_in_lines_and_tables(name):
    value = HOSTILE[name]
    table = Table(title=value)
    table.add_column(value)
    table.add_row(value, styled(("ok", "green"), " ", value))
    out = visible(rendered(value, f"run {value} written", table))
    assert not any(char in out for char in NEVER), repr(out)
    assert neutralised(value) in out  # shown, not dropped: markup as written, escapes made visible


def test_neutralised_shows_each_control_character_as_an_escape():
    assert neutralised("a\x1b[2Jb\x07\x9b\u202e\udcff") == "a\\x1b[2Jb\\x07\\x9b\\u202e\\udcff"
    assert neutralised("two\nlines\ttab") == "two\nlines\ttab"
    assert neutralised("one\nline", newlines=False) == "one\\x0aline"
    assert neutralised("plain ascii [b] ä 中") == "plain ascii [b] ä 中"


def test_suncet_own_styles_still_apply():
    out = rendered(styled(("error:", "red"), " ", "[red]not red[/red]"))
    assert "\x1b[31merror:" in out and "[red]not red[/red]" in out


@pytest.fixture
def hostile_runs(copy_of_finished_run) -> Path:
    """Copies of a finished run whose config.yaml, status and folder names hold each hostile string."""
    folder = None
    for index, (name, value) in enumerate(HOSTILE.items()):
        run = copy_of_finished_run(f"runs/{index:02d}-{name.replace(' ', '-')}")
        folder = run.parent
        config = yaml.safe_load((run / "config.yaml").read_text())
        config.update(method=value, dataset=value, labels=value)
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        status = json.loads((run / "status.json").read_text())
        status.update(state="failed", reason=value)
        (run / "status.json").write_text(json.dumps(status))
    copy_of_finished_run("runs/folder-\x1b]0;title\x07-[/b]")
    copy_of_finished_run(os.fsdecode(b"runs/undecodable-\xff-name"))
    return folder


def test_runs_prints_hostile_run_files_and_folder_names_as_text(hostile_runs):
    result = subprocess.run(
        [SUNCET, "runs", str(hostile_runs)], capture_output=True, env={**os.environ, "COLUMNS": "1000"}, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode("utf-8")
    assert not any(char in out for char in NEVER), out
    assert "[link=https://evil.example]simclr[/link]" in out and "simclr[/b]" in out and "\\x1b]52;c;" in out
    assert "folder-\\x1b]0;title\\x07-[/b]" in out and "undecodable-\\udcff-name" in out
    listed = json.loads(
        subprocess.run([SUNCET, "runs", str(hostile_runs), "--json"], capture_output=True, timeout=120).stdout
    )
    assert len(listed) == len(HOSTILE) + 2
    assert {r["method"] for r in listed} >= set(HOSTILE.values())


def test_an_error_quoting_a_hostile_path_or_value_is_one_line_of_text(tmp_path):
    for arguments in (
        ["runs", str(tmp_path / "\x1b]52;c;QQ==\x07nope")],
        ["eval", "x", "--protocol", "\x1b[2J[/b]"],
        ["\x1b]8;;http://evil\x1b\\cmd"],
        ["--\x1b[2Jflag"],
    ):
        result = subprocess.run([SUNCET, *arguments], capture_output=True, timeout=120)
        err = result.stderr.decode()
        assert result.returncode == 2 and not any(char in err for char in NEVER), err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "\\x1b" in err, err


def test_plugins_prints_a_third_party_docstring_as_text(tmp_path):
    install_fake_distribution(
        tmp_path,
        "fake-hostile-doc",
        "suncet.loggers",
        {"hostile": "fakeplug_hostile:Hostile"},
        {
            "fakeplug_hostile": 'class Hostile:\n    """Logs \\x1b]52;c;cm0gLXJm\\x07 to [link=https://evil.example]here[/link] [/b]"""\n'
        },
    )
    result = subprocess.run(
        [SUNCET, "plugins"],
        capture_output=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "300", "PYTHONPATH": str(tmp_path)},
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert not any(char in out for char in NEVER) and "[link=https://evil.example]here[/link] [/b]" in out


def test_training_into_a_folder_named_with_markup_and_escapes_prints_it_as_text(tmp_path):
    run = tmp_path / "[/b][conceal]\x1b]0;t\x07run"
    result = subprocess.run(
        [SUNCET, "train", *TINY_RUN, "--monitor-every", "0", "--out", str(run)],
        capture_output=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "300"},
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err
    assert not any(char in out + err for char in NEVER) and "[/b][conceal]\\x1b]0;t\\x07run" in out
    assert (run / "checkpoints" / "last.pt").is_file()


def test_runs_keeps_whole_names_at_80_columns(copy_of_finished_run):
    names = ["byol-digits-10pct-seed0-20260101-000000", "simclr-suncet-cifar10-1pct-seed2-20260101-000000"]
    for name in names:
        folder = copy_of_finished_run(f"runs/{name}").parent
    result = CliRunner().invoke(main, ["runs", str(folder)], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in names:
        assert any(name in line for line in lines), result.output
    assert all(len(line) <= 80 for line in lines)


def test_compare_eval_and_export_print_hostile_names_as_text(copy_of_finished_run, monkeypatch):
    run = copy_of_finished_run("[conceal]\x1b]0;t\x07-run")
    monkeypatch.chdir(run.parent)  # short names: each fits one line of the default width
    odd = copy_of_finished_run("odd")
    config = yaml.safe_load((odd / "config.yaml").read_text())
    config["method"] = "[link=https://evil.example]x[/link]\x1b]52;c;QQ==\x07"
    (odd / "config.yaml").write_text(yaml.safe_dump(config))
    compared = CliRunner().invoke(main, ["compare", odd.name])
    evaluated = CliRunner().invoke(main, ["eval", run.name, "--protocol", "knn"])
    exported = CliRunner().invoke(main, ["export", run.name, "--format", "\x1b[2J"])
    for result, shown in ((compared, "[link="), (evaluated, "[conceal]\\x1b]0;t"), (exported, "\\x1b[2J")):
        assert not any(char in result.output for char in NEVER), result.output
        assert shown in result.output, result.output
