"""The default recipes of the built-in datasets (a preset named after a dataset is its default)."""

from __future__ import annotations

from typing import Any

from suncet.registry import register_preset


@register_preset("digits")
def digits() -> dict[str, Any]:
    """Tuned for the bundled digits on 2 CPU cores: a small ResNet for 8 px images, 200 epochs."""
    return {
        "backbone": "small_resnet",
        "epochs": 200,
        "batch_size": 128,
        "classes_per_step": 10,
        "images_per_class": 4,
        "proj_hidden": 512,
        # 8x8 digits give an easy instance task: a warm temperature keeps SimCLR from
        # separating every image and lets classes cluster (docs/data.md, Recipes).
        "tau": 0.5,
        "lr": 2.0,
        "lr_batch": 256,
        "warmup_epochs": 2,
        "weight_decay": 1e-5,
        # Methods with a recipe of their own on digits have a preset named <method>-digits, which
        # a run of that method takes by default (byol-digits, dino-digits, ...).
        "method_defaults": {"swav": {"local_crops": 2}, "paws": {"local_crops": 2}},
    }


@register_preset("cifar10")
def cifar10() -> dict[str, Any]:
    """A quicker CIFAR-10 recipe: ResNet-18, 200 epochs."""
    return {
        "dataset": "cifar10",
        "backbone": "resnet18",
        "epochs": 200,
        "batch_size": 256,
        "classes_per_step": 10,
        "images_per_class": 8,
        "proj_hidden": 2048,
        "lr": 1.2,
        "start_lr": 0.0,
        "lr_batch": 256,
        "warmup_epochs": 10,
        "weight_decay": 1e-6,
        "tau": 0.5,
    }
