"""End-to-end training runs through the CLI on the bundled digits set."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time

import yaml
from conftest import SUNCET

SMALL = ("--batch-size", "64", "--proj-hidden", "64", "--backbone-opt", "width=8", "--warmup-epochs", "1")
TIMING = {"images_per_second", "train_seconds"}


def rows(run):
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_epoch_run_writes_every_file(cli, tmp_path):
    run = tmp_path / "run"
    result = cli("train", "--method", "simclr", "--labels", "10%", "--epochs", "2", *SMALL, "--out", str(run))
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (
        config["method"] == "simclr"
        and config["labels"] == "10%"
        and config["tau"] == 0.5
        and config["proj_dim"] == 128
    )  # defaults included
    metrics = rows(run)
    assert [r["epoch"] for r in metrics] == ["1", "2"]
    for column in ("loss", "ntxent", "suncet", "lr", "images_per_second", "knn_top1"):
        assert metrics[-1][column] != "", column
    labeled = [line for line in (run / "labels.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(labeled) == 144  # 10% of the 1,437 training digits
    assert (run / "checkpoints" / "last.pt").is_file()
    evaluation = json.loads((run / "eval_linear.json").read_text())
    assert 0 <= evaluation["top1"] <= 1 and "raw_pixels" in evaluation
    assert "raw pixels" in result.stdout


def test_worker_pipeline_run_does_not_depend_on_the_worker_count(cli, tmp_path):
    losses = []
    for workers in ("1", "2"):
        run = tmp_path / f"workers{workers}"
        result = cli(
            "train",
            "--epochs",
            "2",
            *SMALL,
            "--data-pipeline",
            "workers",
            "--num-workers",
            workers,
            "--monitor-every",
            "0",
            "--final-eval",
            "none",
            "--out",
            str(run),
        )
        assert result.returncode == 0, result.stderr
        losses.append([{k: v for k, v in row.items() if k not in TIMING} for row in rows(run)])
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_existing_run_is_not_overwritten(cli, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--epochs", "1", *SMALL, "--final-eval", "none", "--out", str(run)).returncode == 0
    before = (run / "metrics.csv").read_text()
    result = cli("train", "--epochs", "1", *SMALL, "--out", str(run))
    assert result.returncode == 2 and "--resume" in result.stderr
    assert (run / "metrics.csv").read_text() == before


def test_killed_run_resumes_to_the_same_metrics(cli, tmp_path):
    args = ("train", "--labels", "10%", "--epochs", "4", *SMALL, "--final-eval", "none", "--seed", "3")
    whole = tmp_path / "whole"
    assert cli(*args, "--out", str(whole)).returncode == 0

    part = tmp_path / "part"
    process = subprocess.Popen(
        [SUNCET, *args, "--checkpoint-every", "30steps", "--out", str(part)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not list(part.glob("checkpoints/step-*.pt")):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(rows(part)) < 4, "the run finished before it could be interrupted"

    result = cli("train", "--resume", str(part))
    assert result.returncode == 0, result.stderr
    expected, got = rows(whole), rows(part)
    assert len(got) == 4
    for e, g in zip(expected, got):
        assert {k: v for k, v in e.items() if k not in TIMING} == {k: v for k, v in g.items() if k not in TIMING}


def test_resume_rejects_other_settings(cli, tmp_path):
    result = cli("train", "--resume", str(tmp_path), "--epochs", "3")
    assert result.returncode == 2 and "--resume" in result.stderr


def test_eval_json_protocols(cli, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--epochs", "1", *SMALL, "--final-eval", "none", "--out", str(run)).returncode == 0
    finetunes = [("finetune", ("--finetune-epochs", "1", "--finetune-head", head)) for head in ("probe", "zero")]
    for protocol, extra in (("knn", ()), ("linear", ()), *finetunes):
        result = cli("eval", str(run), "--protocol", protocol, "--json", *extra)
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["protocol"] == protocol and data["labeled_images"] == 144
        assert 0 <= data["top1"] <= data["top5"] <= 1
        assert 0 <= data["raw_pixels"]["top1"] <= 1
    other = json.loads(cli("eval", str(run), "--protocol", "knn", "--labels", "4/class", "--json").stdout)
    assert other["labeled_images"] == 40


def test_zero_labels_is_plain_simclr_and_supervised_needs_labels(cli, tmp_path):
    run = tmp_path / "plain"
    assert (
        cli("train", "--labels", "0%", "--epochs", "1", *SMALL, "--final-eval", "none", "--out", str(run)).returncode
        == 0
    )
    assert "suncet" not in rows(run)[0]
    result = cli(
        "train", "--method", "supervised", "--labels", "0%", "--epochs", "1", *SMALL, "--out", str(tmp_path / "s")
    )
    assert result.returncode == 2 and "selects none" in result.stderr


def test_supervised_baseline_and_config_file(cli, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "method: supervised\nlabel_loss: ce\nepochs: 3\nlabels: 4/class\nbatch_size: 64\noptimizer: sgd\nlr: 0.1\n"
    )
    run = tmp_path / "run"
    result = cli(
        "train",
        "--config",
        str(config),
        "--epochs",
        "1",
        "--backbone-opt",
        "width=8",
        "--final-eval",
        "none",
        "--out",
        str(run),
    )
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "supervised" and saved["epochs"] == 1 and saved["optimizer"] == "sgd"
    assert "ce" in rows(run)[0] and "suncet" not in rows(run)[0]


def test_bad_config_key_is_one_line(cli, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("epochz: 3\n")
    result = cli("train", "--config", str(config))
    assert result.returncode == 2 and "unknown config file key 'epochz'" in result.stderr
