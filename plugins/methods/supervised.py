"""Supervised baseline: the labeled term alone, no unlabeled images."""

from __future__ import annotations

from torch import Tensor

from suncet.methods import Method, MethodConfig, projection_head
from suncet.registry import register_method


@register_method(
    "supervised", description="the labeled term alone, no unlabeled images (baseline): --label-loss ce or suncet"
)
class Supervised(Method):
    """No objective of its own: the labeled term is the whole loss, the cross-entropy of a
    linear classifier (``--label-loss ce``) or SuNCEt on a projection head."""

    global_views = 0

    def __init__(self, backbone, config: MethodConfig):
        super().__init__(backbone, config)
        if self.labeled_term is not None and self.labeled_term.needs_projection:
            self.head = projection_head(backbone.feature_dim, config.train.proj_hidden, config.train.proj_dim)

    def project(self, features: Tensor) -> Tensor:
        return self.head(features)
