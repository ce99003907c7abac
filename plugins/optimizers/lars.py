"""LARS (You et al. 2017) as SimCLR uses it."""

from __future__ import annotations

from typing import Annotated

import torch
from torch.optim import Optimizer

from suncet.errors import ConfigError
from suncet.registry import Range, register_optimizer


class LARS(Optimizer):
    """SGD with momentum whose step is scaled per tensor by ``eta * ||w|| / ||g + wd * w||``.

    Groups flagged ``lars_exclude`` (biases, normalisation parameters) take a plain momentum
    step with no weight decay and no trust ratio.
    """

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, trust_coefficient: float = 0.001
    ):
        if trust_coefficient <= 0:
            raise ConfigError(f"optimizer lars: trust_coefficient must be positive, got {trust_coefficient}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, lars_exclude=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    weight_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (weight_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * weight_norm / update_norm,
                        torch.ones_like(weight_norm),
                    )
                    update = update * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                # The learning rate sits inside the momentum buffer (v = m v + lr u; w -= v), as in SimCLR.
                buffer.mul_(group["momentum"]).add_(update, alpha=group["lr"])
                p.sub_(buffer)
        return loss


@register_optimizer("lars", description="LARS: layer-wise trust ratio, momentum; biases/norms excluded by type")
def create_lars(
    param_groups,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    trust_coefficient: Annotated[float, Range(0, low_open=True)] = 0.001,
) -> LARS:
    return LARS(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
