"""MoCo v2's published ImageNet run (facebookresearch/moco, main_moco.py with --mlp --moco-t 0.2
--aug-plus --cos) and a digits recipe tuned here; docs/recipes.md cites the lines and says what
suncet cannot express."""

from __future__ import annotations

from typing import Any

from suncet.plugins.presets.datasets import digits
from suncet.registry import register_preset


@register_preset("moco-v2-imagenet")
def moco_v2_imagenet() -> dict[str, Any]:
    """MoCo v2's 200-epoch ImageNet run (ResNet-50, 256 images on 8 GPUs, SGD 0.03 per 256) plus SuNCEt, 10% labels."""
    return {
        "method": "moco",
        "dataset": "imagefolder",
        "labels": "10%",
        "backbone": "resnet50",
        "epochs": 200,
        # per process: MoCo's 32 per GPU (256 on its 8 GPUs); the learning rate scales linearly
        "batch_size": 32,
        "classes_per_step": 10,
        "images_per_class": 2,
        "proj_hidden": 2048,
        "proj_dim": 128,
        "method_options": {"momentum": 0.999, "temperature": 0.2, "queue_size": 65536},
        "tau": 0.1,  # SuNCEt's, the paper's
        "optimizer": "sgd",
        "lr": 0.03,
        "start_lr": 0.03,
        "final_lr": 0.0,
        "lr_batch": 256,
        "lr_batch_counts": "unlabeled",
        "warmup_epochs": 0,
        "weight_decay": 1e-4,
        "momentum": 0.9,
        # aug+: crops of 0.2-1 of the area, jitter 0.4, 0.4, 0.4, 0.1 with p 0.8, grayscale 0.2, blur 0.5
        "augment": {"global_crop_scale": [0.2, 1.0], "color_strength": 0.5, "blur_p": 0.5},
        "monitor_every": 10,
        "final_eval": "linear",
    }


@register_preset("moco-digits")
def moco_v2_digits() -> dict[str, Any]:
    """MoCo v2 + SuNCEt on the bundled digits, tuned on 2 CPU cores (docs/recipes.md)."""
    return {**digits(), "method": "moco", "method_options": {"momentum": 0.99, "queue_size": 1024}}
