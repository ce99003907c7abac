"""The command line as a user meets it: help, version, plugins, doctor, and one-line errors."""

from __future__ import annotations

import suncet


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("train", "eval", "bench", "plugins", "doctor"):
        assert command in result.stdout


def test_version(cli):
    result = cli("--version")
    assert result.returncode == 0 and suncet.__version__ in result.stdout


def test_plugins_table_shows_builtins_with_their_source(cli):
    result = cli("plugins")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for kind, name in [("method", "simclr"), ("method", "supervised"), ("dataset", "digits"),
                       ("backbone", "resnet18"), ("backbone", "small_resnet"), ("optimizer", "lars")]:
        row = next(line for line in lines if f" {name} " in line and kind in line)
        assert " suncet " in row


def test_doctor_reports_versions_and_backends(cli):
    result = cli("doctor")
    assert result.returncode == 0
    assert "torch" in result.stdout and "reference" in result.stdout
    assert "auto selects" in result.stdout


def test_unknown_method_is_one_line_with_the_choices(cli, tmp_path):
    result = cli("train", "--method", "nope", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown method 'nope'" in result.stderr and "simclr" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_label_spec_is_one_line(cli, tmp_path):
    result = cli("train", "--labels", "150%", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "--labels 150%" in result.stderr and "Traceback" not in result.stderr
