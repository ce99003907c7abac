"""DINO's recipes (docs/recipes.md): the authors' ResNet-50 ImageNet run plus SuNCEt, and one tuned
for the bundled digits."""

from __future__ import annotations

from typing import Any

from suncet.plugins.presets.datasets import digits
from suncet.registry import register_preset


@register_preset("dino-imagenet")
def dino_imagenet() -> dict[str, Any]:
    """DINO's ResNet-50 ImageNet run (its README: SGD lr 0.03 per 256, 100 epochs, 8 GPUs) plus SuNCEt, 10% labels."""
    # facebookresearch/dino README "ResNet-50 and other convnets trainings" (--arch resnet50
    # --optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale
    # 0.14 1 --local_crops_scale 0.05 0.14, 8 GPUs), main_dino.py's defaults for the rest.
    return {
        "method": "dino",
        "dataset": "imagefolder",
        "labels": "10%",
        "backbone": "resnet50",
        "epochs": 100,
        # per process (x 8 GPUs in the README's run): 64 unlabeled images, 2 large + 8 small crops;
        # the labeled batch is the SuNCEt paper's, 20 classes x 2 images
        "batch_size": 64,
        "classes_per_step": 20,
        "images_per_class": 2,
        "proj_hidden": 2048,
        "proj_dim": 256,  # DINO head's bottleneck
        "optimizer": "sgd",
        "momentum": 0.9,
        # lr 0.03 x batch / 256, warmed up from 0 over 10 epochs, cosine to min_lr 1e-6 (stated
        # at the README's 512 images; DINO keeps it unscaled)
        "lr": 0.06,
        "start_lr": 0.0,
        "final_lr": 1e-6,
        "lr_batch": 512,
        "lr_batch_counts": "unlabeled",
        "warmup_epochs": 10,
        "weight_decay": 1e-4,  # --weight_decay_end 1e-4: constant
        "sync_bn": True,
        "augment": {
            "global_crop_size": 224,
            "global_crop_scale": [0.14, 1.0],
            "local_crop_size": 96,
            "local_crop_scale": [0.05, 0.14],
            # ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 as strength 0.5 (saturation 0.4), grayscale 0.2,
            # flip 0.5; blur and solarisation at one probability for every crop (docs/recipes.md)
            "color_strength": 0.5,
            "blur_p": 0.5,
            "solarize_p": 0.1,
        },
        "method_options": {
            "out_dim": 65536,
            "head_layers": 3,
            "norm_last_layer": True,
            "local_crops": 8,
            "student_temp": 0.1,
            "teacher_temp": 0.04,
            "warmup_teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 0,
            "center_momentum": 0.9,
            "momentum_teacher": 0.996,
            "freeze_last_layer_epochs": 1.0,
        },
        "monitor_every": 10,
        "final_eval": "linear",
    }


@register_preset("dino-digits")
def dino_digits() -> dict[str, Any]:
    """DINO + SuNCEt tuned for the bundled digits on 2 CPU cores: AdamW, 50 epochs (docs/recipes.md)."""
    recipe = digits()
    return {
        **recipe,
        "method": "dino",
        "epochs": 50,
        # The digits recipe's LARS at 2.0 per 256 (SimCLR's) leaves DINO's loss near log(out_dim);
        # AdamW as DINO's own default, 0.001 per 256 images, weight decay 0.04 (its starting value).
        "optimizer": "adamw",
        "lr": 0.001,
        "lr_batch": 256,
        "weight_decay": 0.04,
        # 10 classes need no 65,536 prototypes; ~2,200 steps want a teacher that follows faster
        "method_options": {"out_dim": 256, "local_crops": 2, "momentum_teacher": 0.99},
    }
