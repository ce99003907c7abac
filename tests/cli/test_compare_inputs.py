"""`suncet compare` given values it cannot use: a target that is no number, a figure file whose
suffix names no format, and a method name that matplotlib would read as mathtext. Each is
refused (or drawn as text) before any table is printed or file written."""

from __future__ import annotations

import yaml
from click.testing import CliRunner
from conftest import refused

from suncet.cli.main import main


def test_a_non_finite_target_is_refused(tmp_path, finished_run):
    refused(tmp_path, ["compare", str(finished_run), "--target", "nan"], "--target")


def test_a_plot_whose_suffix_names_no_format_is_refused_before_any_work(tmp_path, finished_run):
    refused(tmp_path, ["compare", str(finished_run), "--plot", str(tmp_path / "curves.xyz")], "names no figure format")


def test_a_method_name_with_dollar_signs_is_drawn_as_text(tmp_path, copy_of_finished_run):
    plain, odd = copy_of_finished_run("plain"), copy_of_finished_run("odd")
    config = yaml.safe_load((odd / "config.yaml").read_text())
    config["method"] = r"x$\frac{$y"
    (odd / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["compare", str(plain), str(odd), "--plot", str(tmp_path / "curves.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
