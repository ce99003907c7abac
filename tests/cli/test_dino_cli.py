"""DINO from the command line: it trains on digits with SuNCEt and with cross-entropy, evaluates its
teacher, and its ImageNet preset prints the authors' numbers."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import SMALL


@pytest.mark.parametrize("label_loss", ["suncet", "ce"])
def test_dino_trains_on_digits_with_either_label_loss(cli, tmp_path, label_loss):
    run = tmp_path / "run"
    result = cli(
        "train", "--method", "dino", "--labels", "10%", "--label-loss", label_loss, *SMALL, "--final-eval", "knn",
        "--out", str(run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    other = {"suncet": "ce", "ce": "suncet"}[label_loss]
    assert {"loss", "dino", label_loss} <= set(header) and other not in header
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == "dino"
    scores = json.loads((run / "eval_knn.json").read_text())
    assert 0.1 < scores["top1"] <= 1.0


def test_dino_and_its_presets_are_listed(cli):
    listed = cli("plugins")
    assert listed.returncode == 0, listed.stderr
    assert "dino" in listed.stdout and "dino-imagenet" in listed.stdout and "dino-digits" in listed.stdout


@pytest.mark.parametrize("nodes,lr,final_lr", [("1", 0.06, 1e-6), ("8", 0.48, 8e-6)])
def test_dino_imagenet_prints_the_authors_resnet50_recipe(cli, nodes, lr, final_lr):
    result = cli(
        "train", "--preset", "dino-imagenet", "--data", "/tmp/x", "--print-config", "--nproc-per-node", "8",
        "--nnodes", nodes,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    # README: --arch resnet50 --optimizer sgd --lr 0.03 (per 256) on 8 GPUs x 64 images
    assert (printed["method"], printed["backbone"], printed["optimizer"]) == ("dino", "resnet50", "sgd")
    assert printed["lr"] == pytest.approx(lr) and printed["final_lr"] == pytest.approx(final_lr)
    assert printed["lr_batch"] == 64 * 8 * int(nodes) and printed["start_lr"] == 0.0
    assert (printed["epochs"], printed["warmup_epochs"], printed["weight_decay"], printed["momentum"]) == (
        100,
        10,
        1e-4,
        0.9,
    )
    assert (printed["proj_hidden"], printed["proj_dim"]) == (2048, 256)
    options = printed["method_options"]
    assert (options["out_dim"], options["local_crops"], options["momentum_teacher"]) == (65536, 8, 0.996)
    assert (options["student_temp"], options["teacher_temp"], options["warmup_teacher_temp"]) == (0.1, 0.04, 0.04)
    assert (options["center_momentum"], options["freeze_last_layer_epochs"]) == (0.9, 1.0)
    augment = printed["augment"]
    assert (augment["global_crop_size"], augment["global_crop_scale"]) == (224, [0.14, 1.0])
    assert (augment["local_crop_size"], augment["local_crop_scale"]) == (96, [0.05, 0.14])
