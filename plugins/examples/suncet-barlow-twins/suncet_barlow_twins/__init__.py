"""Barlow Twins as a suncet method plugin.

The loss pushes the cross-correlation matrix of the two views' standardised embeddings
towards the identity: invariance on the diagonal, redundancy reduction off it. The labeled
term (SuNCEt or cross-entropy, ``--label-loss``) is added by ``suncet.methods.Method``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from suncet.methods import Method, MethodConfig, Views


def barlow_twins_loss(z1: Tensor, z2: Tensor, redundancy_weight: float) -> Tensor:
    z1 = z1.float()
    z2 = z2.float()
    n = z1.shape[0]
    c = ((z1 - z1.mean(0)) / z1.std(0).clamp(min=1e-6)).T @ ((z2 - z2.mean(0)) / z2.std(0).clamp(min=1e-6)) / n
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    off_diagonal = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diagonal + redundancy_weight * off_diagonal


class BarlowTwins(Method):
    """Barlow Twins (cross-correlation to identity) + SuNCEt or cross-entropy on the labeled subset."""

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

    def project(self, features: Tensor) -> Tensor:
        return self.head(features)

    def objective(self, views: Views) -> dict[str, Tensor]:
        z1, z2 = self.head(views.global_features).chunk(2)
        barlow = barlow_twins_loss(z1, z2, self.options.redundancy_weight)
        return {"loss": barlow, "barlow": barlow}
