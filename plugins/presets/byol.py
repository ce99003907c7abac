"""BYOL's published ImageNet run (google-deepmind/deepmind-research, byol/) and a digits recipe
tuned here; docs/recipes.md cites the lines and says what suncet cannot express."""

from __future__ import annotations

from typing import Any

from suncet.plugins.presets.datasets import digits
from suncet.registry import register_preset


@register_preset("byol-imagenet")
def byol_imagenet() -> dict[str, Any]:
    """BYOL's 1000-epoch ImageNet run (ResNet-50, 4,096 images, LARS 0.2 per 256) plus SuNCEt, 10% labels."""
    return {
        "method": "byol",
        "dataset": "imagefolder",
        "labels": "10%",
        "backbone": "resnet50",
        "epochs": 1000,
        # per process: 64 x 64 = 4,096 images, BYOL's global batch
        "batch_size": 64,
        "classes_per_step": 20,
        "images_per_class": 2,
        "proj_hidden": 4096,
        "proj_dim": 256,
        "method_options": {"momentum": 0.996, "predictor_hidden": 4096},
        "tau": 0.1,  # SuNCEt's, the paper's
        "optimizer": "lars",
        "optimizer_options": {"trust_coefficient": 0.001},
        "lr": 0.2,
        "start_lr": 0.0,
        "final_lr": 0.0,
        "lr_batch": 256,
        "lr_batch_counts": "unlabeled",
        "warmup_epochs": 10,
        "weight_decay": 1.5e-6,
        "momentum": 0.9,
        # One recipe for both views (suncet's): the mean of BYOL's two, which blur with p 1.0
        # and 0.1 and solarize with p 0 and 0.2; colour jitter 0.4, 0.4, 0.4, 0.1 (BYOL: 0.2 saturation).
        "augment": {"color_strength": 0.5, "blur_p": 0.55, "solarize_p": 0.1},
        "sync_bn": True,
        "monitor_every": 10,
        "final_eval": "linear",
    }


@register_preset("byol-digits")
def byol_digits() -> dict[str, Any]:
    """BYOL + SuNCEt on the bundled digits, tuned on 2 CPU cores (docs/recipes.md)."""
    return {**digits(), "method": "byol", "method_options": {"momentum": 0.99}}
