"""SimCLR: NT-Xent on the unlabeled views; the base class adds SuNCEt or cross-entropy."""

from __future__ import annotations

import torch
from torch import Tensor

from suncet.methods import Method, MethodConfig, Views, projection_head
from suncet.registry import register_method


@register_method("simclr", description="SimCLR (NT-Xent) + SuNCEt (or cross-entropy) on the labeled subset")
class SimCLR(Method):
    """NT-Xent over the projections of [view1; view2]; with SuNCEt, both terms come from one
    fused launch over [view1; view2; labeled]."""

    def __init__(self, backbone, config: MethodConfig):
        super().__init__(backbone, config)
        self.head = projection_head(backbone.feature_dim, config.train.proj_hidden, config.train.proj_dim)

    def project(self, features: Tensor) -> Tensor:
        return self.head(features)

    def objective(self, views: Views) -> dict[str, Tensor]:
        out0, out1 = self.head(views.global_features).chunk(2)
        ntxent = self.losses.ntxent(out0, out1)
        return {"loss": ntxent, "ntxent": ntxent}

    def objective_with_suncet(
        self, views: Views, labeled_features: Tensor, labels: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        z = self.head(torch.cat([views.global_features, labeled_features]))
        batch = views.batch_size
        ntxent, suncet = self.losses.ntxent_suncet(z[:batch], z[batch : 2 * batch], z[2 * batch :], labels)
        return {"loss": ntxent, "ntxent": ntxent}, suncet
