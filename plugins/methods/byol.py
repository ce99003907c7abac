"""BYOL (Grill et al. 2020): an online network predicts a moving-average target's projection of
the other view; the base class adds SuNCEt or cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from suncet.ema import EMA
from suncet.errors import ConfigError
from suncet.losses import NegativeCosineSimilarity
from suncet.methods import Method, MethodConfig, Views
from suncet.registry import register_method


def byol_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear - BatchNorm - ReLU - Linear, BYOL's projector and predictor."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


@register_method(
    "byol", description="BYOL (online predictor, moving-average target, 2 - 2 cos) + SuNCEt (or cross-entropy)"
)
class BYOL(Method):
    """The online network (backbone, projector, predictor) predicts the target's projection of
    the other view, both ways: ``(2 - 2 cos(p0, z1')) + (2 - 2 cos(p1, z0'))``, averaged over the
    batch. The target (backbone and projector) is an exponential moving average of the online
    ones, its momentum rising from ``momentum`` to 1 on a half cosine over the run. SuNCEt
    compares the online projector's outputs; evaluation and export use the online backbone."""

    @dataclass
    class Options:
        momentum: float = 0.996  # the target's momentum at the first step (1 at the last)
        predictor_hidden: int = 0  # 0: the projector's hidden width (--proj-hidden)

    def __init__(self, backbone: nn.Module, config: MethodConfig):
        super().__init__(backbone, config)
        o, train = self.options, config.train
        if not (0 <= o.momentum <= 1) or o.predictor_hidden < 0:
            raise ConfigError("byol options need 0 <= momentum <= 1 and predictor_hidden >= 0 (0: --proj-hidden)")
        self.projector = byol_mlp(backbone.feature_dim, train.proj_hidden, train.proj_dim)
        self.predictor = byol_mlp(train.proj_dim, o.predictor_hidden or train.proj_hidden, train.proj_dim)
        self.target = EMA(self._online(), config.steps_per_epoch * train.epochs, o.momentum)
        self.regression = NegativeCosineSimilarity()

    def _online(self) -> nn.Module:
        """The network the target follows (a view of the online modules, not a copy)."""
        return nn.Sequential(self.backbone, self.projector)

    def project(self, features: Tensor) -> Tensor:
        return self.projector(features)

    def objective(self, views: Views) -> dict[str, Tensor]:
        p0, p1 = self.predictor(self.projector(views.global_features)).chunk(2)
        with torch.no_grad():
            # One pass per view, as BYOL's code runs each view through the target on its own.
            z0, z1 = (self.target(view) for view in views.global_views)
        byol = (2 + 2 * self.regression(p0, z1)) + (2 + 2 * self.regression(p1, z0))
        return {"loss": byol, "byol": byol}

    def after_optimizer_step(self, step: int) -> None:
        self.target.update(self._online(), step)
