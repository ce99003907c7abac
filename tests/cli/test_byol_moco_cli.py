"""BYOL and MoCo v2 from the command line: each trains on digits with SuNCEt and with
--label-loss ce, and its presets print the authors' numbers (bad options: test_hostile_inputs.py)."""

from __future__ import annotations

import pytest
import yaml
from conftest import SMALL

from suncet.optim import scale_learning_rates
from suncet.presets import build_config


@pytest.mark.parametrize("method,term", [("byol", "byol"), ("moco", "moco")])
@pytest.mark.parametrize("label_loss", ["suncet", "ce"])
def test_trains_on_digits_with_either_label_loss(cli, tmp_path, method, term, label_loss):
    run = tmp_path / "run"
    result = cli(
        "train", "--method", method, "--labels", "10%", *SMALL, "--label-loss", label_loss, "--final-eval", "knn",
        "--out", str(run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss", term, label_loss} <= set(header)
    assert 0.1 < yaml.safe_load((run / "eval_knn.json").read_text())["top1"] <= 1.0


def printed(cli, preset: str, *processes: str) -> dict:
    result = cli("train", "--preset", preset, "--data", "/nonexistent", "--print-config", *processes)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_byol_imagenet_prints_byols_numbers_on_64_processes(cli):
    config = printed(cli, "byol-imagenet", "--nproc-per-node", "8", "--nnodes", "8")
    assert config["method"] == "byol" and config["backbone"] == "resnet50" and config["epochs"] == 1000
    assert config["lr_batch"] == 4096 and config["optimizer"] == "lars"
    assert (config["lr"], config["start_lr"], config["final_lr"]) == pytest.approx((3.2, 0.0, 0.0))
    assert (config["weight_decay"], config["momentum"], config["warmup_epochs"]) == pytest.approx((1.5e-6, 0.9, 10))
    assert config["method_options"] == {"momentum": 0.996, "predictor_hidden": 4096}
    assert (config["proj_hidden"], config["proj_dim"], config["sync_bn"]) == (4096, 256, True)


def test_moco_v2_imagenet_prints_mocos_numbers_on_its_8_gpus_and_scales_linearly(cli):
    config = printed(cli, "moco-v2-imagenet", "--nproc-per-node", "8")
    assert config["method"] == "moco" and config["epochs"] == 200 and config["optimizer"] == "sgd"
    assert config["lr_batch"] == 256 and config["lr"] == pytest.approx(0.03) and config["final_lr"] == 0
    assert (config["weight_decay"], config["momentum"], config["warmup_epochs"]) == pytest.approx((1e-4, 0.9, 0))
    assert config["method_options"] == {"momentum": 0.999, "temperature": 0.2, "queue_size": 65536}
    assert (config["proj_hidden"], config["proj_dim"]) == (2048, 128)
    assert config["augment"] == {"global_crop_scale": [0.2, 1.0], "color_strength": 0.5, "blur_p": 0.5}
    wide = scale_learning_rates(build_config(overrides={"preset": "moco-v2-imagenet"}), 64, frozenset())
    assert wide.lr_batch == 2048 and wide.lr == pytest.approx(0.24)  # MoCo's README: linear in the batch


@pytest.mark.parametrize(
    "preset,options",
    [("byol-digits", {"momentum": 0.99}), ("moco-digits", {"momentum": 0.99, "queue_size": 1024})],
)
def test_digits_presets_and_the_digits_defaults_agree(preset, options):
    assert build_config(overrides={"preset": preset}).method_options == options
    method = "byol" if preset.startswith("byol") else "moco"
    assert build_config(overrides={"method": method}).method_options == options
