"""`suncet export` and `suncet.load_backbone`: a trained backbone read back by torchvision, timm
and safetensors, giving the features suncet's own backbone gives on real digit images."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

import suncet
from suncet.errors import ConfigError
from suncet.registry import DATASETS

# Supervised training reads only the labeled images: the quickest real run of a ResNet-18.
TINY = dict(epochs=1, batch_size=256, warmup_epochs=1, monitor_every=0, final_eval="none")


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet") / "run"
    return suncet.train(method="supervised", backbone="resnet18", out=out, **TINY).run_dir


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    return suncet.train(method="simclr", proj_hidden=64, backbone_options={"width": 8}, out=out, **TINY).run_dir


@pytest.fixture(scope="module")
def digits():
    """Test images of digits, normalised as in training (the recipe's mean and std)."""
    dataset = DATASETS.create("digits", root=None, download=False)
    mean, std = torch.tensor(dataset.recipe.mean), torch.tensor(dataset.recipe.std)
    images = dataset.test.load(torch.arange(64)).float() / 255
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def features(model, images):
    with torch.no_grad():
        return model.eval()(images)


def with_cifar_stem(model, in_channels):
    """The run's stem (resnet18 on 8 px inputs takes the CIFAR one), as the export's hint says."""
    model.conv1 = torch.nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def test_torchvision_export_loads_into_torchvision_with_the_same_features(resnet_run, digits, cli, tmp_path):
    out = tmp_path / "resnet18.pt"
    result = cli("export", str(resnet_run), "--format", "torchvision", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "torchvision.models.resnet18()" in result.stdout and "model.maxpool = torch.nn.Identity()" in result.stdout
    model = with_cifar_stem(torchvision.models.resnet18(), in_channels=1)
    missing = model.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(missing.missing_keys) == ["fc.bias", "fc.weight"] and not missing.unexpected_keys
    model.fc = torch.nn.Identity()
    torch.testing.assert_close(
        features(model, digits), features(suncet.load_backbone(resnet_run), digits), rtol=0, atol=1e-6
    )


def test_timm_export_loads_into_timm_with_the_same_features(resnet_run, digits, tmp_path):
    timm = pytest.importorskip("timm")
    exported = suncet.export_backbone(resnet_run, "timm", tmp_path / "timm.pt")
    assert "timm.create_model('resnet18')" in exported.load_with
    model = with_cifar_stem(timm.create_model("resnet18", in_chans=1), in_channels=1)
    missing = model.load_state_dict(torch.load(exported.path, weights_only=True), strict=False)
    assert sorted(missing.missing_keys) == ["fc.bias", "fc.weight"] and not missing.unexpected_keys
    model.reset_classifier(0)
    torch.testing.assert_close(
        features(model, digits), features(suncet.load_backbone(resnet_run), digits), rtol=0, atol=1e-6
    )


def test_safetensors_export_describes_the_backbone_and_loads_without_pickle(resnet_run, digits, tmp_path, monkeypatch):
    safetensors = pytest.importorskip("safetensors")
    exported = suncet.export_backbone(resnet_run, "safetensors", tmp_path / "backbone.safetensors")
    with safetensors.safe_open(str(exported.path), framework="pt") as handle:
        info = json.loads(handle.metadata()["suncet.backbone"])
    assert {k: info[k] for k in ("backbone", "options", "in_channels", "image_size", "feature_dim", "mean", "std")} == {
        "backbone": "resnet18",
        "options": {},
        "in_channels": 1,
        "image_size": 8,
        "feature_dim": 512,
        "mean": [0.3],
        "std": [0.4],
    }
    expected = features(suncet.load_backbone(resnet_run), digits)

    def no_pickle(*args, **kwargs):
        raise AssertionError("a safetensors export must load without torch.load")

    monkeypatch.setattr(torch, "load", no_pickle)
    torch.testing.assert_close(features(suncet.load_backbone(exported.path), digits), expected, rtol=0, atol=0)


def test_backbone_without_torchvision_equivalent_refuses_and_exports_to_safetensors(small_run, digits, cli):
    result = cli("export", str(small_run), "--format", "torchvision")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: backbone 'small_resnet' has no torchvision equivalent; export it with --format safetensors and load "
        "it with suncet.load_backbone"
    ]
    result = cli("export", str(small_run))
    assert result.returncode == 0, result.stderr
    exported = small_run / "backbone.safetensors"
    assert f"suncet.load_backbone('{exported}')" in result.stdout
    reloaded = features(suncet.load_backbone(exported), digits)
    torch.testing.assert_close(reloaded, features(suncet.load_backbone(small_run), digits), rtol=0, atol=0)


def test_bad_sources_are_one_line_errors(small_run, tmp_path, cli):
    with pytest.raises(ConfigError, match="no such run directory or exported backbone file"):
        suncet.load_backbone(tmp_path / "missing")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ConfigError, match="cannot be read as a safetensors file"):
        suncet.load_backbone(broken)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    foreign = tmp_path / "foreign.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ConfigError, match="not a suncet backbone export"):
        suncet.load_backbone(foreign)
    result = cli("export", str(small_run), "--format", "onnx")
    assert result.returncode == 2 and "--format must be one of safetensors, torchvision, timm" in result.stderr
    result = cli("export", str(tmp_path / "missing"))
    assert result.returncode == 2 and "no such run directory" in result.stderr and "Traceback" not in result.stderr
