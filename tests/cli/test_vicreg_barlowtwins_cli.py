"""VICReg and Barlow Twins from the command line: each trains on digits with SuNCEt and with
--label-loss ce and logs its own terms (bad options: test_hostile_inputs.py); the ImageNet presets print
the authors' numbers for 64 processes; the built-in Barlow Twins does not take the example
package's name."""

from __future__ import annotations

import pytest
import yaml
from conftest import SMALL

TERMS = {"vicreg": {"vicreg", "invariance", "variance", "covariance"}, "barlowtwins": {"barlowtwins", "on_diagonal"}}


@pytest.mark.parametrize("method", ["vicreg", "barlowtwins"])
@pytest.mark.parametrize("label_loss", ["suncet", "ce"])
def test_trains_on_digits_with_either_label_loss(cli, tmp_path, method, label_loss):
    run = tmp_path / "run"
    result = cli("train", "--method", method, "--labels", "10%", "--label-loss", label_loss, *SMALL, "--out", str(run))
    assert result.returncode == 0, result.stderr
    header = set((run / "metrics.csv").read_text().splitlines()[0].split(","))
    other = {"suncet": "ce", "ce": "suncet"}[label_loss]
    assert TERMS[method] | {"loss", label_loss} <= header and other not in header


@pytest.mark.parametrize("preset,method", [("vicreg-imagenet", "vicreg"), ("barlow-twins-imagenet", "barlowtwins")])
def test_imagenet_presets_print_the_authors_numbers_on_64_processes(cli, preset, method):
    result = cli(
        "train",
        "--preset",
        preset,
        "--data",
        "/nonexistent",
        "--print-config",
        "--nproc-per-node",
        "8",
        "--nnodes",
        "8",
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["method"] == method and printed["lr_batch"] == 2048 and printed["batch_size"] * 64 == 2048
    # 0.2 per 256 images at 2,048: 1.6, warmed up from 0 over 10 epochs, cosine to 0.001 of it
    assert (printed["lr"], printed["start_lr"], printed["final_lr"]) == pytest.approx((1.6, 0.0, 0.0016))
    assert (printed["epochs"], printed["warmup_epochs"], printed["weight_decay"]) == pytest.approx((1000, 10, 1e-6))
    assert printed["optimizer"] == "lars" and printed["optimizer_options"] == {"trust_coefficient": 0.001}
    assert (printed["proj_hidden"], printed["proj_dim"], printed["momentum"], printed["sync_bn"]) == (
        8192,
        8192,
        0.9,
        True,
    )
    options = printed["method_options"]
    if method == "vicreg":
        assert (options["sim_coeff"], options["std_coeff"], options["cov_coeff"]) == (25.0, 25.0, 1.0)
    else:
        assert options["lambd"] == pytest.approx(0.0051)


def test_the_builtin_barlow_twins_leaves_the_example_packages_name_free(cli):
    result = cli("plugins")
    assert result.returncode == 0, result.stderr
    names = {cells[2].strip() for cells in (line.split("│") for line in result.stdout.splitlines()) if len(cells) > 3}
    assert "barlowtwins" in names and "vicreg" in names and "barlow_twins" not in names


@pytest.mark.parametrize("preset,method", [("vicreg-digits", "vicreg"), ("barlowtwins-digits", "barlowtwins")])
def test_digits_presets_are_the_digits_recipe_for_50_epochs(cli, preset, method):
    result = cli("train", "--preset", preset, "--print-config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert (printed["method"], printed["dataset"], printed["backbone"], printed["epochs"]) == (
        method,
        "digits",
        "small_resnet",
        50,
    )
    assert (printed["batch_size"], printed["proj_hidden"], printed["proj_dim"]) == (128, 512, 128)
