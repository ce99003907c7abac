"""Supervised baseline: cross-entropy on the labeled subset only, no unlabeled images."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from suncet.methods import Method, MethodConfig, TrainBatch
from suncet.registry import register_method


@register_method("supervised", description="cross-entropy on the labeled subset only (baseline)")
class Supervised(Method):
    global_views = 0

    def __init__(self, backbone, config: MethodConfig):
        super().__init__(backbone, config)
        self.classifier = nn.Linear(backbone.feature_dim, config.num_classes)

    def wants_labeled(self, epoch: int) -> bool:
        return True

    def forward(self, batch: TrainBatch) -> dict[str, Tensor]:
        loss = F.cross_entropy(self.classifier(self.backbone(batch.labeled)).float(), batch.labels)
        return {"loss": loss, "cross_entropy": loss}
