"""DINO (Caron et al. 2021): self-distillation with an EMA teacher and multi-crop; the base class
adds SuNCEt or cross-entropy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.ema import EMA
from suncet.errors import ConfigError
from suncet.losses import DINOLoss
from suncet.methods import Method, MethodConfig, Views
from suncet.registry import register_method


class DINOHead(nn.Module):
    """DINO's head (vision_transformer.py, DINOHead): an MLP with GELU to a bottleneck, L2-normalised,
    then a weight-normalised linear layer to ``out_dim`` outputs. With ``norm_last_layer`` the
    rows of that layer are unit vectors (weight_norm's magnitude fixed at 1); without, each row
    also has a trained magnitude."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int, layers: int, norm_last_layer: bool):
        super().__init__()
        widths = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            blocks += [nn.Linear(a, b)] + ([nn.GELU()] if i < layers - 1 else [])
        self.mlp = nn.Sequential(*blocks)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)  # weight_norm's direction
        self.last_layer_magnitude = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))

    def embed(self, features: Tensor) -> Tensor:
        """The L2-normalised bottleneck: what the last layer scores."""
        return F.normalize(self.mlp(features), dim=-1)

    def forward(self, features: Tensor, freeze_last_layer: bool = False) -> Tensor:
        weight = F.normalize(self.last_layer.weight, dim=1)
        if self.last_layer_magnitude is not None:
            weight = weight * self.last_layer_magnitude
        # A frozen last layer gets no gradient at all, so the optimizer leaves it untouched.
        return F.linear(self.embed(features), weight.detach() if freeze_last_layer else weight)


@register_method(
    "dino", description="DINO (EMA teacher, centring and sharpening, multi-crop) + SuNCEt (or cross-entropy)"
)
class DINO(Method):
    """The student (backbone + DINO head) sees every crop; the teacher, an exponential moving
    average of both, sees the two large crops, whose centred, sharpened softmax is the target of
    the student's softmax of every other crop. Evaluation and export use the teacher's backbone,
    as DINO evaluates its teacher.

    SuNCEt compares the labeled images' L2-normalised bottleneck of the student head
    (``DINOHead.embed``): DINO normalises that embedding itself and its last layer scores it
    against the prototypes, so it is DINO's counterpart of SimCLR's projection and SwAV's
    normalised embedding, the cosine geometry SuNCEt works in; the softmax over the prototypes
    is a distribution, not an embedding, and a separate projection of the backbone features
    would add a head that only the labeled term trains.
    """

    may_skip_parameters = True  # the last layer while frozen

    @dataclass
    class Options:
        out_dim: int = 65536  # prototypes: outputs of the head's last layer
        head_layers: int = 3  # linear layers before the bottleneck (widths proj_hidden, then proj_dim)
        norm_last_layer: bool = True
        local_crops: int = 8
        student_temp: float = 0.1
        teacher_temp: float = 0.04
        warmup_teacher_temp: float = 0.04
        warmup_teacher_temp_epochs: int = 0
        center_momentum: float = 0.9
        momentum_teacher: float = 0.996  # rises to 1 on a half cosine over the run
        freeze_last_layer_epochs: float = 1.0

    def __init__(self, backbone: nn.Module, config: MethodConfig):
        super().__init__(backbone, config)
        o = self.options
        temperatures = (o.student_temp, o.teacher_temp, o.warmup_teacher_temp)
        if (
            o.out_dim < 1
            or o.head_layers < 1
            or o.local_crops < 0
            or not all(math.isfinite(t) and t >= 1e-3 for t in temperatures)
            or o.warmup_teacher_temp_epochs < 0
            or not 0 <= o.center_momentum <= 1
            or not 0 <= o.momentum_teacher <= 1
            or o.freeze_last_layer_epochs < 0
        ):
            raise ConfigError(
                "dino options need out_dim >= 1, head_layers >= 1, local_crops >= 0, student_temp, teacher_temp and "
                "warmup_teacher_temp >= 0.001, warmup_teacher_temp_epochs >= 0, center_momentum and momentum_teacher "
                "in [0, 1], freeze_last_layer_epochs >= 0"
            )
        self.local_views = o.local_crops
        train = config.train
        self.head = DINOHead(
            backbone.feature_dim, train.proj_hidden, train.proj_dim, o.out_dim, o.head_layers, o.norm_last_layer
        )
        total_steps = max(1, config.steps_per_epoch * train.epochs)
        self.teacher_backbone = EMA(backbone, total_steps, o.momentum_teacher)
        self.teacher_head = EMA(self.head, total_steps, o.momentum_teacher)
        self.dino_loss = DINOLoss(
            o.out_dim,
            o.warmup_teacher_temp,
            o.teacher_temp,
            o.warmup_teacher_temp_epochs,
            o.student_temp,
            o.center_momentum,
        )
        self.freeze_iters = round(o.freeze_last_layer_epochs * config.steps_per_epoch)

    def evaluated_backbone(self) -> nn.Module:
        return self.teacher_backbone.target

    def after_optimizer_step(self, step: int) -> None:
        self.teacher_backbone.update(self.backbone, step)
        self.teacher_head.update(self.head, step)

    def project(self, features: Tensor) -> Tensor:
        return self.head.embed(features)

    def objective(self, views: Views) -> dict[str, Tensor]:
        frozen = views.step < self.freeze_iters
        crops = len(views.global_views)
        student = list(self.head(views.global_features, frozen).chunk(crops))
        if views.local_views:
            local_sizes = [v.shape[0] for v in views.local_views]
            student += list(self.head(self.encode(torch.cat(views.local_views)), frozen).split(local_sizes))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(views.global_views))).chunk(crops)
        dino = self.dino_loss(list(teacher), student, epoch=views.epoch)
        return {"loss": dino, "dino": dino}
