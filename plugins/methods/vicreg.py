"""VICReg (Bardes et al. 2022); the base class adds SuNCEt or cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from suncet.errors import ConfigError
from suncet.losses import VICRegLoss
from suncet.methods import Method, MethodConfig, Views
from suncet.registry import register_method


def expander(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """The authors' expander (facebookresearch/vicreg, main_vicreg.py, ``Projector``): ``layers``
    linear layers, each but the last followed by BatchNorm and ReLU; the last without bias."""
    widths = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    blocks: list[nn.Module] = []
    for i in range(layers - 1):
        blocks += [nn.Linear(widths[i], widths[i + 1]), nn.BatchNorm1d(widths[i + 1]), nn.ReLU(inplace=True)]
    blocks.append(nn.Linear(widths[-2], widths[-1], bias=False))
    return nn.Sequential(*blocks)


@register_method("vicreg", description="VICReg (invariance, variance, covariance) + SuNCEt (or cross-entropy)")
class VICReg(Method):
    """Invariance, variance and covariance terms on the expander outputs of the two views;
    SuNCEt compares the labeled images' expander outputs (normalised inside the loss)."""

    @dataclass
    class Options:
        sim_coeff: float = 25.0  # invariance weight (the authors' --sim-coeff)
        std_coeff: float = 25.0  # variance weight (--std-coeff)
        cov_coeff: float = 1.0  # covariance weight (--cov-coeff)
        expander_layers: int = 3  # linear layers: proj_hidden wide, proj_dim out (8192-8192-8192: 3)

    def __init__(self, backbone: nn.Module, config: MethodConfig):
        super().__init__(backbone, config)
        o = self.options
        if o.sim_coeff < 0 or o.std_coeff < 0 or o.cov_coeff < 0 or o.expander_layers < 1:
            raise ConfigError("vicreg options need sim_coeff, std_coeff, cov_coeff >= 0 and expander_layers >= 1")
        self.head = expander(backbone.feature_dim, config.train.proj_hidden, config.train.proj_dim, o.expander_layers)
        self.vicreg_loss = VICRegLoss(o.sim_coeff, o.std_coeff, o.cov_coeff, gather=self.losses.gather)

    def project(self, features: Tensor) -> Tensor:
        return self.head(features)

    def objective(self, views: Views) -> dict[str, Tensor]:
        z_a, z_b = self.head(views.global_features).chunk(2)
        invariance, variance, covariance = self.vicreg_loss.terms(z_a, z_b)
        o = self.options
        vicreg = o.sim_coeff * invariance + o.std_coeff * variance + o.cov_coeff * covariance
        return {
            "loss": vicreg,
            "vicreg": vicreg,
            "invariance": invariance,
            "variance": variance,
            "covariance": covariance,
        }
