"""A copy of the example plugin as written to the earlier method contract (forward returns the
whole loss, labeled term included), kept to test that such plugins still work as they did.

Barlow Twins as a suncet method plugin.

The loss pushes the cross-correlation matrix of the two views' standardised embeddings
towards the identity: invariance on the diagonal, redundancy reduction off it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from suncet.losses import suncet_loss
from suncet.methods import Method, MethodConfig, TrainBatch, forward_in_one_pass


def barlow_twins_loss(z1: Tensor, z2: Tensor, redundancy_weight: float) -> Tensor:
    z1 = z1.float()
    z2 = z2.float()
    n = z1.shape[0]
    c = ((z1 - z1.mean(0)) / z1.std(0).clamp(min=1e-6)).T @ ((z2 - z2.mean(0)) / z2.std(0).clamp(min=1e-6)) / n
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    off_diagonal = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diagonal + redundancy_weight * off_diagonal


class BarlowTwins(Method):
    """Barlow Twins (cross-correlation to identity) + SuNCEt on the labeled subset."""

    @dataclass
    class Options:
        redundancy_weight: float = 0.005

    def __init__(self, backbone: nn.Module, config: MethodConfig):
        super().__init__(backbone, config)
        hidden, out = config.train.proj_hidden, config.train.proj_dim
        self.head = nn.Sequential(
            nn.Linear(backbone.feature_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out),
        )
        self.uses_labels = config.train.suncet_weight > 0

    def forward(self, batch: TrainBatch) -> dict[str, Tensor]:
        parts = list(batch.global_views) + ([batch.labeled] if batch.labeled is not None else [])
        z = forward_in_one_pass(self.backbone, self.head, parts)
        barlow = barlow_twins_loss(z[0], z[1], self.options.redundancy_weight)
        terms = {"barlow": barlow}
        loss = barlow
        if batch.labeled is not None:
            suncet = suncet_loss(z[2], batch.labels, self.config.train.tau, backend=self.config.train.backend, gather=self.config.gather)
            terms["suncet"] = suncet
            loss = loss + self.config.train.suncet_weight * suncet
        return {"loss": loss, **terms}
