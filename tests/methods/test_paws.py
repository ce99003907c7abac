"""PAWS as a method plugin: trains on digits, refuses to run without supports, its presets, and
the soft nearest-neighbour evaluation every method gets."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import SUNCET

SMALL = (
    "--batch-size",
    "64",
    "--proj-hidden",
    "64",
    "--backbone-opt",
    "width=8",
    "--epochs",
    "1",
    "--monitor-every",
    "0",
    "--method-opt",
    "local_crops=1",
)


def test_paws_trains_on_digits_and_evaluates_by_soft_nearest_neighbour(cli, tmp_path):
    run = tmp_path / "run"
    result = cli("train", "--method", "paws", "--labels", "10%", *SMALL, "--final-eval", "snn", "--out", str(run))
    assert result.returncode == 0, result.stderr
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "paws", "me_max"} <= set(header) and "suncet" not in header and "ce" not in header
    scores = json.loads((run / "eval_snn.json").read_text())
    assert scores["protocol"] == "snn" and 0.1 < scores["top1"] <= 1.0


@pytest.mark.parametrize(
    "arguments,message",
    [
        (("--labels", "0%"), "trains on labeled images, but --labels 0% selects none"),
        (("--suncet-weight", "0"), "trains on labeled images, but --suncet-weight 0 turns them off"),
        (
            ("--epochs", "3", "--suncet-epochs", "1"),
            "trains on labeled images in every epoch; --suncet-epochs cannot stop them",
        ),
        (("--label-loss", "ce"), "uses the labels in its own objective; --label-loss does not apply"),
        (("--method-opt", "sharpen_temperature=0"), "option sharpen_temperature of method PAWS must be > 0"),
        (("--method-opt", "label_smoothing=nan"), "option label_smoothing of method PAWS must be a finite float"),
    ],
)
def test_paws_without_supports_or_with_bad_options_is_refused_in_one_line(cli, tmp_path, arguments, message):
    result = cli("train", "--method", "paws", *SMALL, *arguments, "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset,labels", [("paper-paws-imagenet-10pct", "10%"), ("paper-paws-imagenet-1pct", "1%")])
def test_paws_imagenet_presets_print_the_papers_rates_on_64_processes(cli, preset, labels):
    result = cli("train", "--preset", preset, "--print-config", "--nproc-per-node", "8", "--nnodes", "8")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert (printed["lr"], printed["start_lr"], printed["final_lr"]) == pytest.approx((6.4, 0.3, 0.064))
    assert printed["method"] == "paws" and printed["labels"] == labels and printed["lr_batch"] == 4096
    assert (printed["classes_per_step"], printed["images_per_class"], printed["proj_dim"]) == (15, 7, 2048)


def test_paws_cifar10_preset_is_wrn_28_2_at_3_2(cli):
    result = cli("train", "--preset", "paws-cifar10", "--print-config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert (printed["backbone"], printed["backbone_options"]) == ("wide_resnet", {"depth": 28, "widen": 2})
    assert (printed["lr"], printed["start_lr"], printed["final_lr"], printed["epochs"]) == pytest.approx(
        (3.2, 0.8, 0.032, 600)
    )
    assert printed["method_options"]["prediction_head"] is False and printed["labels"] == "400/class"


def test_wide_resnet_28_2_has_its_published_size():
    from suncet.plugins.backbones.resnet import wide_resnet

    net = wide_resnet(in_channels=3, image_size=32)
    assert net.feature_dim == 128 and 1.4e6 < sum(p.numel() for p in net.parameters()) < 1.5e6
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_soft_nearest_neighbour_protocol_matches_a_float64_loop():
    from suncet.engine.protocols import snn_classify

    g = torch.Generator().manual_seed(2)
    bank, bank_labels = torch.randn(30, 8, generator=g), torch.arange(30) % 4
    test, test_labels = torch.randn(12, 8, generator=g), torch.arange(12) % 4
    scores = snn_classify(bank, bank_labels, test, test_labels, 4)
    b, t = F.normalize(bank.double(), dim=1), F.normalize(test.double(), dim=1)
    predicted = []
    for row in t:
        weights = torch.softmax(torch.stack([row @ col / 0.1 for col in b]), 0)
        predicted.append(int(torch.stack([weights[bank_labels == c].sum() for c in range(4)]).argmax()))
    assert scores.top1 == pytest.approx((torch.tensor(predicted) == test_labels).float().mean().item())


def test_every_method_gets_the_snn_protocol(cli, tmp_path):
    run = tmp_path / "simclr"
    assert cli("train", *SMALL[:-2], "--final-eval", "none", "--out", str(run)).returncode == 0
    result = cli("eval", str(run), "--protocol", "snn", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["protocol"] == "snn"


def test_paws_trains_under_torchrun_with_two_processes(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        [
            SUNCET,
            "train",
            "--method",
            "paws",
            "--nproc-per-node",
            "2",
            *SMALL,
            "--batch-size",
            "32",
            "--final-eval",
            "none",
            "--out",
            str(run),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "paws" in (run / "metrics.csv").read_text().splitlines()[0]
