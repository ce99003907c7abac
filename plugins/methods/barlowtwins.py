"""Barlow Twins (Zbontar et al. 2021); the base class adds SuNCEt or cross-entropy.

Registered as ``barlowtwins``: ``barlow_twins`` is the name of the example third-party package
(plugins/examples/suncet-barlow-twins), and two plugins under one name make the registry refuse
the name (suncet/registry.py) once that package is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from suncet.errors import ConfigError
from suncet.losses import BarlowTwinsLoss
from suncet.methods import Method, MethodConfig, Views
from suncet.registry import register_method


def projector(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """The authors' projector (facebookresearch/barlowtwins, main.py, ``BarlowTwins.__init__``):
    ``layers`` linear layers without bias, each but the last followed by BatchNorm and ReLU."""
    widths = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    blocks: list[nn.Module] = []
    for i in range(layers - 1):
        blocks += [nn.Linear(widths[i], widths[i + 1], bias=False), nn.BatchNorm1d(widths[i + 1])]
        blocks.append(nn.ReLU(inplace=True))
    blocks.append(nn.Linear(widths[-2], widths[-1], bias=False))
    return nn.Sequential(*blocks)


@register_method(
    "barlowtwins", description="Barlow Twins (cross-correlation to the identity) + SuNCEt (or cross-entropy)"
)
class BarlowTwins(Method):
    """The cross-correlation of the two views' batch-standardised projector outputs is pushed to
    the identity; SuNCEt compares the labeled images' projector outputs (normalised inside the loss)."""

    @dataclass
    class Options:
        lambd: float = 0.0051  # weight of the off-diagonal terms (the authors' --lambd)
        projector_layers: int = 3  # linear layers: proj_hidden wide, proj_dim out (8192-8192-8192: 3)

    def __init__(self, backbone: nn.Module, config: MethodConfig):
        super().__init__(backbone, config)
        o = self.options
        if o.lambd < 0 or o.projector_layers < 1:
            raise ConfigError("barlowtwins options need lambd >= 0 and projector_layers >= 1")
        self.head = projector(backbone.feature_dim, config.train.proj_hidden, config.train.proj_dim, o.projector_layers)
        self.barlow_loss = BarlowTwinsLoss(o.lambd, gather=self.losses.gather)

    def project(self, features: Tensor) -> Tensor:
        return self.head(features)

    def objective(self, views: Views) -> dict[str, Tensor]:
        z_a, z_b = self.head(views.global_features).chunk(2)
        on_diagonal, off_diagonal = self.barlow_loss.terms(z_a, z_b)
        barlowtwins = on_diagonal + self.options.lambd * off_diagonal
        return {
            "loss": barlowtwins,
            "barlowtwins": barlowtwins,
            "on_diagonal": on_diagonal,
            "off_diagonal": off_diagonal,
        }
