"""The engine's own contracts: the compiled step, host syncs every k steps, the Python API,
and the CLI generated from the config dataclass."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch
from conftest import SMALL_TRAINING

import suncet
from suncet.config import TrainConfig
from suncet.data import TrainBatch
from suncet.errors import ConfigError
from suncet.methods import MethodConfig
from suncet.plugins.backbones.resnet import small_resnet
from suncet.plugins.methods.simclr import SimCLR

SMALL = (*SMALL_TRAINING, "--monitor-every", "0")  # the last value of a flag wins
TIMING = {"images_per_second", "train_seconds"}


def _simclr_and_batch(backend: str):
    torch.manual_seed(0)
    config = TrainConfig(proj_hidden=32, proj_dim=16, backend=backend, tau=0.5)
    method = SimCLR(small_resnet(in_channels=1, image_size=8, width=4), MethodConfig(config, num_classes=10))
    images = torch.randn(3, 8, 1, 8, 8)
    batch = TrainBatch(global_views=[images[0], images[1]], labeled=images[2], labels=torch.arange(8) % 4)
    return method, batch


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_step_compiles_as_one_graph_with_the_same_loss_and_gradients(backend):
    """fullgraph=True fails on any graph break, the custom ops included; aot_eager also traces
    the backward through the ops' fake implementations."""
    method, batch = _simclr_and_batch(backend)
    eager = method(batch)
    eager["loss"].backward()
    eager_grads = [p.grad.clone() for p in method.parameters()]
    method.zero_grad(set_to_none=True)
    compiled = torch.compile(method, fullgraph=True, backend="aot_eager")(batch)
    compiled["loss"].backward()
    for key in ("loss", "ntxent", "suncet"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6)
    for p, g in zip(method.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def _rows(run):
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(handle)]


def test_syncing_every_k_steps_gives_the_same_metrics(cli, tmp_path):
    for k in ("1", "5"):
        result = cli("train", "--epochs", "2", *SMALL, "--sync-every", k, "--out", str(tmp_path / k))
        assert result.returncode == 0, result.stderr
    assert _rows(tmp_path / "1") == _rows(tmp_path / "5") and len(_rows(tmp_path / "1")) == 2


def test_python_api_trains_and_returns_the_backbone(tmp_path):
    result = suncet.train(
        epochs=1,
        batch_size=64,
        proj_hidden=64,
        backbone_options={"width": 8},
        monitor_every=0,
        final_eval="knn",
        out=tmp_path / "run",
    )
    assert result.run_dir == tmp_path / "run" and result.metrics["epoch"] == 1
    assert 0 <= result.evaluation["top1"] <= 1 and (tmp_path / "run" / "eval_knn.json").is_file()
    backbone = suncet.load_backbone(result.run_dir)
    from suncet.engine.evaluate import load_trained

    run = load_trained(result.run_dir)
    images = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), run.method.backbone(images), rtol=0, atol=0)


def test_python_api_refuses_an_existing_run_and_resumes_it(tmp_path):
    settings = dict(
        epochs=1, batch_size=64, proj_hidden=64, backbone_options={"width": 8}, monitor_every=0, final_eval="none"
    )
    suncet.train(settings, out=tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run"):
        suncet.train(settings, out=tmp_path / "run")
    again = suncet.train(resume=tmp_path / "run")
    assert again.metrics["epoch"] == 1 and again.metrics["loss"] > 0  # nothing left to train: its last row


def test_every_config_field_has_a_train_flag_with_help(cli):
    help_text = cli("train", "--help").stdout
    for f in dataclasses.fields(TrainConfig):
        if f.name == "run_dir":
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert flag in help_text and f.metadata["help"], f.name


def test_a_term_that_first_appears_at_a_later_step_is_logged_over_its_own_steps():
    from suncet.engine.loop import Meters

    meters = Meters()
    meters.add({"loss": torch.tensor(1.0)}, step=0)
    meters.add({"loss": torch.tensor(3.0), "late": torch.tensor(5.0)}, step=1)
    meters.add({"loss": torch.tensor(2.0), "late": torch.tensor(7.0)}, step=2)
    assert meters.means(torch.device("cpu")) == {"late": 6.0, "loss": 2.0}
    again = Meters(meters.state_dict())  # a checkpoint taken mid-epoch continues the same means
    again.add({"loss": torch.tensor(6.0), "later": torch.tensor(1.0)}, step=3)
    assert again.means(torch.device("cpu")) == {"late": 6.0, "later": 1.0, "loss": 3.0}
    # A checkpoint written before per-term counts held one step count for every term.
    assert Meters({"sums": {"loss": 6.0, "ntxent": 4.0}, "steps": 2}).means(torch.device("cpu")) == {
        "loss": 3.0,
        "ntxent": 2.0,
    }
