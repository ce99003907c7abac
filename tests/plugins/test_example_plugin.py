"""The example third-party package, installed into the test environment, used end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

EXAMPLE = REPO / "plugins" / "examples" / "suncet-barlow-twins"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """Install the example with pip into a directory that the test processes import from."""
    target = tmp_path_factory.mktemp("site-packages")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    # No empty entry: it would put the working directory (the checkout's unbuilt suncet/) first.
    return {"PYTHONPATH": os.pathsep.join(p for p in [str(target), os.environ.get("PYTHONPATH")] if p)}


def test_example_plugin_is_listed_with_its_package(cli, plugin_env):
    result = cli("plugins", env=plugin_env)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "barlow_twins" in line)
    assert "suncet-barlow-twins" in row and "method" in row


def test_example_plugin_trains_and_evaluates(cli, plugin_env, tmp_path):
    run = tmp_path / "run"
    result = cli(
        "train",
        "--method",
        "barlow_twins",
        "--labels",
        "10%",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--method-opt",
        "redundancy_weight=0.01",
        "--final-eval",
        "none",
        "--out",
        str(run),
        env=plugin_env,
    )
    assert result.returncode == 0, result.stderr
    assert "barlow" in (run / "metrics.csv").read_text().splitlines()[0]
    result = cli("eval", str(run), "--protocol", "knn", "--json", env=plugin_env)
    assert result.returncode == 0, result.stderr
    assert 0.0 <= json.loads(result.stdout)["top1"] <= 1.0


def test_example_plugin_honours_label_loss_ce(cli, plugin_env, tmp_path):
    run = tmp_path / "run"
    result = cli(
        "train",
        "--method",
        "barlow_twins",
        "--labels",
        "10%",
        "--label-loss",
        "ce",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--proj-hidden",
        "64",
        "--final-eval",
        "none",
        "--out",
        str(run),
        env=plugin_env,
    )
    assert result.returncode == 0, result.stderr
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "ce" in header and "barlow" in header and "suncet" not in header


def test_unknown_option_of_the_plugin_is_a_clear_error(cli, plugin_env, tmp_path):
    result = cli(
        "train", "--method", "barlow_twins", "--method-opt", "lambda=1", "--out", str(tmp_path / "r"), env=plugin_env
    )
    assert result.returncode == 2
    assert "unknown option 'lambda' for method BarlowTwins; known: redundancy_weight" in result.stderr
