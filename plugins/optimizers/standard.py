"""PyTorch's SGD and AdamW behind the optimizer plugin interface."""

from __future__ import annotations

from typing import Annotated

import torch

from suncet.registry import Range, register_optimizer


def _plain(groups):
    # torch's optimizers keep unknown group keys; dropping ours keeps their state dicts clean.
    return [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]


@register_optimizer("sgd", description="SGD with (Nesterov) momentum; no decay on biases/norms")
def create_sgd(
    param_groups, *, lr: float, weight_decay: float, momentum: float, nesterov: bool = False
) -> torch.optim.SGD:
    return torch.optim.SGD(_plain(param_groups), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


@register_optimizer("adamw", description="AdamW (momentum sets beta1); no decay on biases/norms")
def create_adamw(
    param_groups,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    beta2: Annotated[float, Range(0, 1)] = 0.999,
    eps: Annotated[float, Range(0, low_open=True)] = 1e-8,
) -> torch.optim.AdamW:
    return torch.optim.AdamW(_plain(param_groups), lr=lr, betas=(momentum, beta2), weight_decay=weight_decay, eps=eps)
