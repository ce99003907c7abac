"""The paper's recipes: presets at any world size, the learning-rate rule, and the
cross-entropy alternative to SuNCEt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from suncet.config import TrainConfig
from suncet.data import TrainBatch
from suncet.methods import MethodConfig
from suncet.optim import scale_learning_rates
from suncet.plugins.backbones.resnet import small_resnet
from suncet.plugins.methods.simclr import SimCLR
from suncet.plugins.methods.swav import SwAV
from suncet.presets import build_config, given_keys


def resolved(file_values: dict | None = None, overrides: dict | None = None, world: int = 1) -> TrainConfig:
    """The settings and learning rates a run of ``world`` processes uses (before any fit to its data)."""
    config = build_config(file_values, overrides)
    return scale_learning_rates(config, world, given_keys(file_values, overrides))


@pytest.mark.parametrize("world", [1, 8, 64])
def test_paper_imagenet_presets_count_the_batch_as_the_paper_did(world):
    """The paper's 4.8 from 0.6 on 64 GPUs: each GPU's 44 x 2 unlabeled and 40 labeled views counted
    as 64 images, 4,096 in all; 0.3 per 256 such images (512 views) at any world size."""
    for preset, labels in (("paper-imagenet-10pct", "10%"), ("paper-imagenet-1pct", "1%")):
        config = resolved(overrides={"preset": preset}, world=world)
        views = (2 * 44 + 20 * 2) * world
        assert config.labels == labels and config.method == "simclr" and config.backbone == "resnet50"
        assert config.lr == pytest.approx(0.3 * views / 512) and config.start_lr == pytest.approx(0.6 * views / 8192)
        assert config.lr_batch == views and config.lr_batch_counts == "views" and config.final_lr == 0.0
        assert (config.epochs, config.suncet_epochs, config.classes_per_step, config.images_per_class) == (
            500,
            250,
            20,
            2,
        )
        assert (
            config.sync_bn and config.optimizer == "lars" and config.optimizer_options == {"trust_coefficient": 0.001}
        )
        assert (config.weight_decay, config.warmup_epochs, config.tau, config.final_eval) == (1e-6, 10, 0.1, "finetune")
    assert resolved(overrides={"preset": "paper-imagenet-10pct"}, world=64).lr == pytest.approx(4.8)


def test_the_labeled_views_count_only_while_the_labeled_term_is_on():
    config = resolved(overrides={"preset": "paper-imagenet-10pct", "suncet_weight": 0.0}, world=64)
    assert config.lr_batch == 88 * 64 and config.lr == pytest.approx(0.3 * 88 * 64 / 512)


def test_swav_preset_is_swavs_own_imagenet_script_at_4096_images():
    config = resolved(overrides={"preset": "paper-swav-imagenet-10pct"}, world=64)
    assert config.method == "swav" and config.batch_size * 64 == 4096
    assert config.lr == pytest.approx(4.8) and config.final_lr == pytest.approx(0.0048) and config.warmup_epochs == 0
    assert config.method_options["prototypes"] == 3000 and config.method_options["queue_length"] == 3840
    assert config.method_options["queue_start_epoch"] == 15 and config.augment == {"global_crop_scale": [0.14, 1.0]}
    assert config.epochs == 800 and config.weight_decay == 1e-6
    eight = resolved(overrides={"preset": "paper-swav-imagenet-10pct"}, world=8)
    assert eight.lr == pytest.approx(0.6)  # the same preset on 8 GPUs: 512 images per step


def test_paper_cifar10_preset_is_the_reference_codes_cifar_run():
    from suncet.plugins.datasets.cifar import cifar_recipe

    config = resolved(overrides={"preset": "paper-cifar10"}, world=1)
    assert (config.dataset, config.backbone, config.backbone_options) == ("cifar10", "resnet50", {"cifar_stem": True})
    assert config.labels == "400/class" and config.augment == {}  # 4,000 labels; the dataset's own augmentation
    recipe = cifar_recipe((0.5,) * 3, (0.25,) * 3)
    assert (recipe.global_crop.size, recipe.global_crop.scale) == (32, (0.08, 1.0))
    assert (recipe.color_strength, recipe.grayscale_p, recipe.blur_p) == (0.5, 0.2, 0.0)
    # the SimCLR + SuNCEt recipe's count: 256 x 2 unlabeled + 10 x 8 labeled views on one process
    assert config.lr == pytest.approx(0.3 * 592 / 512) and config.sync_bn


def test_an_explicit_learning_rate_wins_and_lr_batch_scales_what_the_user_states():
    config = resolved(overrides={"preset": "paper-imagenet-10pct", "lr": 2.0}, world=8)
    assert config.lr == 2.0 and config.start_lr == pytest.approx(0.6 * 1024 / 8192)
    config = resolved(overrides={"lr": 0.5, "lr_batch": 256, "batch_size": 64}, world=2)
    assert config.lr == pytest.approx(0.25) and config.lr_batch == 128
    plain = resolved({"preset": "cifar10", "lr_batch": None}, world=4)  # lr_batch: null in a file
    assert plain.lr == 1.2 and plain.lr_batch is None  # no stated batch: nothing is scaled


def test_digits_preset_keeps_the_readme_learning_rate():
    config = resolved(world=1)
    assert config.batch_size == 128 and config.lr == pytest.approx(1.0)


def test_saved_config_is_not_scaled_again():
    from suncet.config import config_from_saved, to_yaml

    config = resolved(overrides={"preset": "paper-imagenet-10pct"}, world=8)
    assert config_from_saved(yaml.safe_load(to_yaml(config)), "x") == config


def test_print_config_resolves_the_preset_for_the_processes_named(cli):
    result = cli(
        "train", "--preset", "paper-imagenet-10pct", "--print-config", "--nproc-per-node", "8", "--nnodes", "8"
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert result.stdout.splitlines()[0].startswith("# preset paper-imagenet-10pct; learning rates for 64 process(es)")
    assert printed["lr"] == pytest.approx(4.8) and printed["start_lr"] == pytest.approx(0.6)
    assert printed["lr_batch"] == 8192 and printed["sync_bn"] is True
    refused = cli("train", "--nnodes", "2")
    assert refused.returncode == 2 and "--nnodes only sizes --print-config" in refused.stderr


def test_the_preset_a_dataset_applies_by_default_is_named_and_recorded(cli, tmp_path):
    printed = cli("train", "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.splitlines()[0].startswith("# preset digits;")
    assert yaml.safe_load(printed.stdout)["preset"] == "digits"
    assert build_config().preset == "digits" and build_config(overrides={"dataset": "imagefolder"}).preset is None


def test_a_method_with_a_recipe_of_its_own_on_the_dataset_takes_it_by_default(cli, tmp_path):
    # dino-digits (AdamW) is DINO's default on digits; an explicit preset, file or flag still wins,
    # and a method without one keeps the dataset's own.
    dino = build_config(overrides={"method": "dino"})
    assert dino.preset == "dino-digits" and dino.optimizer == "adamw" and dino.method_options["out_dim"] == 256
    assert build_config({"method": "byol"}).preset == "byol-digits"
    assert build_config(overrides={"method": "simclr"}).preset == "digits"
    explicit = build_config(overrides={"method": "dino", "preset": "digits"})
    assert explicit.preset == "digits" and explicit.optimizer == "lars" and explicit.method_options == {}
    assert build_config(overrides={"method": "dino", "optimizer": "sgd"}).optimizer == "sgd"
    printed = cli("train", "--method", "moco", "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.splitlines()[0].startswith("# preset moco-digits;")


def test_run_header_shows_the_effective_learning_rate(cli, tmp_path):
    result = cli(
        "train",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--proj-hidden",
        "64",
        "--backbone-opt",
        "width=8",
        "--sync-bn",
        "--monitor-every",
        "0",
        "--final-eval",
        "none",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr  # --sync-bn is a no-op for one process, CPU included
    assert "lr 0.5 (for a global batch of 64)" in " ".join(result.stdout.split())
    assert result.stdout.splitlines()[0].startswith("simclr on digits (preset digits): ")  # the first line names it
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 0.5


def _labeled_batch():
    images = torch.randn(3, 8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return TrainBatch(
        global_views=[images[0], images[1]], labeled=images[2], labels=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    )


@pytest.mark.parametrize("method_cls", [SimCLR, SwAV])
def test_cross_entropy_label_term_matches_a_float64_reference(method_cls):
    torch.manual_seed(0)
    train = TrainConfig(
        proj_hidden=32,
        proj_dim=16,
        backend="reference",
        tau=0.5,
        label_loss="ce",
        suncet_weight=0.7,
        method_options={"local_crops": 0} if method_cls is SwAV else {},
    )
    method = method_cls(small_resnet(in_channels=1, image_size=8, width=4), MethodConfig(train, num_classes=4))
    method.eval()  # BatchNorm by running statistics: the features below are the forward's own
    batch = _labeled_batch()
    terms = method(batch)
    assert set(terms) == {"loss", "ce", "ntxent" if method_cls is SimCLR else "swav"}
    first = terms["ntxent" if method_cls is SimCLR else "swav"]
    torch.testing.assert_close(terms["loss"], first + 0.7 * terms["ce"])
    with torch.no_grad():
        h = method.backbone(batch.labeled).double()
    head = method.labeled_term.head
    w, b = head.weight.double(), head.bias.double()
    logits = h @ w.T + b
    p = torch.softmax(logits, dim=1)
    onehot = F.one_hot(batch.labels, 4).double()
    expected = -(onehot * torch.log(p)).sum(1).mean()
    assert abs(terms["ce"].item() - expected.item()) < 1e-5
    method.zero_grad()
    terms["ce"].backward()
    expected_grad = (p - onehot).T @ h / len(batch.labels)  # d CE / d W of the mean cross-entropy
    torch.testing.assert_close(head.weight.grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_ce_label_head_is_not_part_of_the_backbone_and_suncet_runs_have_none():
    from suncet.engine.assemble import may_skip_parameters

    train = TrainConfig(proj_hidden=32, proj_dim=16, backend="reference")
    method = SimCLR(small_resnet(in_channels=1, image_size=8, width=4), MethodConfig(train, num_classes=4))
    assert not list(method.labeled_term.parameters()) and "suncet" in method(_labeled_batch())
    ce = TrainConfig(proj_hidden=32, proj_dim=16, label_loss="ce", suncet_epochs=5)
    method = SimCLR(small_resnet(in_channels=1, image_size=8, width=4), MethodConfig(ce, num_classes=4))
    assert may_skip_parameters(method) and not any("labeled_term" in k for k in method.backbone.state_dict())
