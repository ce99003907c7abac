"""The papers' runs (docs/recipes.md): SimCLR + SuNCEt on ImageNet at 10% and 1% labels, SwAV's
ImageNet script plus SuNCEt, the reference code's CIFAR-10 run, and PAWS's ImageNet and CIFAR-10
runs (method.md section 9)."""

from __future__ import annotations

from typing import Any

from suncet.registry import register_preset


def _simclr_suncet(labels: str) -> dict[str, Any]:
    return {
        "method": "simclr",
        "dataset": "imagefolder",
        "labels": labels,
        "backbone": "resnet50",
        "epochs": 500,
        "suncet_epochs": 250,
        # per process (x 64 GPUs in the paper): 44 unlabeled x 2 views + 20 classes x 2 labeled
        "batch_size": 44,
        "classes_per_step": 20,
        "images_per_class": 2,
        "proj_hidden": 2048,
        "proj_dim": 128,
        "tau": 0.1,
        "optimizer": "lars",
        "optimizer_options": {"trust_coefficient": 0.001},
        # The paper's 4.8 from 0.6 on 64 GPUs counted each GPU's 128 views as 64 images:
        # 0.3 and 0.0375 per 256 such images, i.e. per 512 views.
        "lr": 0.3,
        "start_lr": 0.0375,
        "final_lr": 0.0,
        "lr_batch": 512,
        "lr_batch_counts": "views",
        "warmup_epochs": 10,
        "weight_decay": 1e-6,
        "momentum": 0.9,
        "sync_bn": True,
        "monitor_every": 10,
        "final_eval": "finetune",
    }


@register_preset("paper-imagenet-10pct")
def paper_imagenet_10pct() -> dict[str, Any]:
    """The paper's SimCLR + SuNCEt ImageNet run with 10% labels (ResNet-50, 500 epochs)."""
    return _simclr_suncet("10%")


@register_preset("paper-imagenet-1pct")
def paper_imagenet_1pct() -> dict[str, Any]:
    """The paper's SimCLR + SuNCEt ImageNet run with 1% labels (ResNet-50, 500 epochs)."""
    return _simclr_suncet("1%")


@register_preset("paper-swav-imagenet-10pct")
def paper_swav_imagenet_10pct() -> dict[str, Any]:
    """SwAV's batch-4096 ImageNet script plus SuNCEt, 10% labels (800 epochs)."""
    return {
        **_simclr_suncet("10%"),
        "method": "swav",
        # SwAV's own rule: 64 images per GPU, LARS, 4.8 -> 0.0048 at 4,096 images, no warm-up
        "epochs": 800,
        "suncet_epochs": None,
        "batch_size": 64,
        "lr": 0.3,
        "start_lr": 0.0,
        "final_lr": 0.0003,
        "lr_batch": 256,
        "lr_batch_counts": "unlabeled",
        "warmup_epochs": 0,
        "augment": {"global_crop_scale": [0.14, 1.0]},
        "method_options": {
            "prototypes": 3000,
            "temperature": 0.1,
            "local_crops": 6,
            "sinkhorn_eps": 0.05,
            "sinkhorn_iters": 3,
            "freeze_prototypes_epochs": 1.0,
            "queue_length": 3840,
            "queue_start_epoch": 15,
        },
    }


@register_preset("paper-cifar10")
def paper_cifar10() -> dict[str, Any]:
    """The reference code's December 2020 CIFAR-10 run: the SimCLR + SuNCEt recipe, 4,000 labels."""
    # Its one optimisation recipe (LARS, trust 0.001, weight decay 1e-6, 10 warm-up epochs,
    # cosine) on ResNet-50 with the CIFAR stem; the cifar10 dataset's recipe is its augmentation
    # (crop 32 at 0.08-1, colour 0.5, grayscale 0.2, no blur).
    return {
        **_simclr_suncet("400/class"),
        "dataset": "cifar10",
        "backbone_options": {"cifar_stem": True},
        "batch_size": 256,
        "classes_per_step": 10,
        "images_per_class": 8,
    }


def _paws_imagenet(labels: str) -> dict[str, Any]:
    return {
        "method": "paws",
        "dataset": "imagefolder",
        "labels": labels,
        "backbone": "resnet50",
        "epochs": 100,
        # per process (x 64 GPUs): 64 unlabeled images (2 large + 6 small crops), 15 classes x 7 supports
        "batch_size": 64,
        "classes_per_step": 15,
        "images_per_class": 7,
        "proj_hidden": 2048,
        "proj_dim": 2048,
        "method_options": {
            "temperature": 0.1,
            "sharpen_temperature": 0.25,
            "local_crops": 6,
            "label_smoothing": 0.1,
            "me_max": True,
            "prediction_head": True,
        },
        "augment": {"global_crop_scale": [0.14, 1.0]},
        "optimizer": "lars",
        "optimizer_options": {"trust_coefficient": 0.001},
        # 6.4 from 0.3 to 0.064 at 4,096 unlabeled images (64 x 64): per 256, 0.4 from 0.01875 to 0.004
        "lr": 0.4,
        "start_lr": 0.01875,
        "final_lr": 0.004,
        "lr_batch": 256,
        "lr_batch_counts": "unlabeled",
        "warmup_epochs": 10,
        "weight_decay": 1e-6,
        "momentum": 0.9,
        "sync_bn": True,
        "monitor_every": 10,
        "final_eval": "snn",
    }


@register_preset("paper-paws-imagenet-10pct")
def paper_paws_imagenet_10pct() -> dict[str, Any]:
    """PAWS's ImageNet run with 10% labels (ResNet-50, 100 epochs, lr 6.4 on 64 GPUs)."""
    return _paws_imagenet("10%")


@register_preset("paper-paws-imagenet-1pct")
def paper_paws_imagenet_1pct() -> dict[str, Any]:
    """PAWS's ImageNet run with 1% labels (ResNet-50, 100 epochs, lr 6.4 on 64 GPUs)."""
    return _paws_imagenet("1%")


@register_preset("paws-cifar10")
def paws_cifar10() -> dict[str, Any]:
    """PAWS's CIFAR-10 run: WRN-28-2, 4,000 labels, 600 epochs, lr 3.2 at 256 images."""
    return {
        **_paws_imagenet("400/class"),
        "dataset": "cifar10",
        "backbone": "wide_resnet",
        "backbone_options": {"depth": 28, "widen": 2},
        "epochs": 600,
        "batch_size": 256,
        # 10 classes x 64 supports (PAWS takes two views of each; one here)
        "classes_per_step": 10,
        "images_per_class": 64,
        "proj_hidden": 128,
        "proj_dim": 128,
        "method_options": {
            "temperature": 0.1,
            "sharpen_temperature": 0.25,
            "local_crops": 6,
            "label_smoothing": 0.1,
            "me_max": True,
            "prediction_head": False,
        },
        # PAWS's CIFAR-10 crops: large 32 px of 0.75-1 of the area, small 18 px of 0.3-0.75
        "augment": {"global_crop_scale": [0.75, 1.0], "local_crop_size": 18, "local_crop_scale": [0.3, 0.75]},
        "lr": 3.2,
        "start_lr": 0.8,
        "final_lr": 0.032,
        "sync_bn": False,
    }
