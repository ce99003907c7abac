"""The authors' ImageNet recipes of VICReg and Barlow Twins, plus SuNCEt, and their digits
recipes tuned here (docs/recipes.md)."""

from __future__ import annotations

from typing import Any

from suncet.registry import register_preset


def _imagenet(method: str) -> dict[str, Any]:
    """What the two authors' scripts share (facebookresearch/vicreg main_vicreg.py,
    facebookresearch/barlowtwins main.py): ResNet-50, a 2,048-image batch (32 per process on 64),
    LARS (eta 0.001, momentum 0.9, biases and norms excluded from decay and adaptation), linear
    warm-up from 0 over 10 epochs, cosine to 0.001 of the peak, 1,000 epochs, SyncBN,
    an 8192-8192-8192 head, two 224 px crops of 0.08-1 of the area."""
    return {
        "method": method,
        "dataset": "imagefolder",
        "labels": "10%",
        "backbone": "resnet50",
        "epochs": 1000,
        "batch_size": 32,  # x 64 processes = 2,048
        # SuNCEt's labeled batch, our choice (the papers have none): 16 classes x 2 per process,
        # about as many labeled as unlabeled images, as in the SuNCEt paper's ImageNet runs.
        "classes_per_step": 16,
        "images_per_class": 2,
        "proj_hidden": 8192,
        "proj_dim": 8192,
        "optimizer": "lars",
        "optimizer_options": {"trust_coefficient": 0.001},
        "lr": 0.2,
        "start_lr": 0.0,
        "final_lr": 0.0002,
        "lr_batch": 256,
        "lr_batch_counts": "unlabeled",
        "warmup_epochs": 10,
        "weight_decay": 1e-6,
        "momentum": 0.9,
        "sync_bn": True,
        # ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2; blur 1.0 / 0.1 and solarize 0 / 0.2
        # on the two views, as one recipe for both: their means (docs/recipes.md)
        "augment": {"global_crop_scale": [0.08, 1.0], "color_strength": 0.5, "blur_p": 0.55, "solarize_p": 0.1},
        "monitor_every": 10,
        "final_eval": "linear",
    }


@register_preset("vicreg-imagenet")
def vicreg_imagenet() -> dict[str, Any]:
    """VICReg's 1,000-epoch ImageNet run (batch 2,048, LARS 0.2 per 256) plus SuNCEt, 10% labels."""
    return {
        **_imagenet("vicreg"),
        "method_options": {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0, "expander_layers": 3},
    }


@register_preset("barlow-twins-imagenet")
def barlow_twins_imagenet() -> dict[str, Any]:
    """Barlow Twins' 1,000-epoch ImageNet run (batch 2,048, LARS 0.2 per 256 for weights) plus SuNCEt, 10% labels."""
    # The biases' and BatchNorm's own rate (0.0048 per 256) is not expressible: one rate serves
    # every parameter group (docs/recipes.md).
    return {
        **_imagenet("barlowtwins"),
        "method_options": {"lambd": 0.0051, "projector_layers": 3},
    }


def _digits(method: str) -> dict[str, Any]:
    """The digits recipe (small ResNet, batch 128, LARS 2.0 per 256, 512-128 head) with the
    method's three-layer head, 50 epochs: measured here (docs/recipes.md)."""
    from suncet.plugins.presets.datasets import digits

    return {**digits(), "method": method, "epochs": 50, "monitor_every": 10}


@register_preset("vicreg-digits")
def vicreg_digits() -> dict[str, Any]:
    """VICReg + SuNCEt on digits: the digits recipe, 50 epochs (linear probe 0.953 at 10% labels, seed 0)."""
    return _digits("vicreg")


@register_preset("barlowtwins-digits")
def barlow_twins_digits() -> dict[str, Any]:
    """Barlow Twins + SuNCEt on digits: the digits recipe, 50 epochs (linear probe 0.964 at 10% labels, seed 0)."""
    return _digits("barlowtwins")
