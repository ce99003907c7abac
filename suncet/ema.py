"""An exponential moving average of a network: BYOL's target, MoCo's key encoder, DINO's teacher.

``EMA(online, total_steps, base_momentum)`` holds a frozen copy of ``online`` (``ema.target``);
``ema.update(online, step)`` moves its parameters towards the online ones with the momentum of
that step. The momentum rises from ``base_momentum`` to ``final_momentum`` on a half cosine over
``total_steps`` (BYOL's schedule; ``final_momentum = base_momentum`` keeps it constant, as MoCo).
The copy is a submodule, so checkpoints, resume and DDP's start-up broadcast carry it with the
method's other weights; the schedule is a function of the step alone, so it needs no state of its own.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from suncet.errors import ConfigError


class EMA(nn.Module):
    def __init__(self, online: nn.Module, total_steps: int, base_momentum: float, final_momentum: float = 1.0):
        super().__init__()
        for name, value in (("base_momentum", base_momentum), ("final_momentum", final_momentum)):
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ConfigError(f"EMA {name} must be a number in [0, 1], got {value!r}")
        if total_steps < 1:
            raise ConfigError(f"EMA total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.base_momentum = float(base_momentum)
        self.final_momentum = float(final_momentum)
        self.target = copy.deepcopy(online)
        # Out of the optimizer and of DDP's gradient reduction: only update() changes it.
        self.target.requires_grad_(False)

    def momentum(self, step: int) -> float:
        """The momentum of the update after the run's 0-based global ``step``."""
        progress = min(max(step, 0), self.total_steps) / self.total_steps
        weight = (math.cos(math.pi * progress) + 1.0) / 2.0
        return self.final_momentum - (self.final_momentum - self.base_momentum) * weight

    @torch.no_grad()
    def update(self, online: nn.Module, step: int) -> None:
        """target = m * target + (1 - m) * online, parameter by parameter. Buffers (BatchNorm's
        running statistics) stay the target's own, kept by its own forward passes as the papers'
        code does."""
        m = self.momentum(step)
        target = list(self.target.parameters())
        source = list(online.parameters())
        if len(target) != len(source) or any(t.shape != s.shape for t, s in zip(target, source)):
            raise ConfigError("EMA.update needs the network the target was copied from")
        torch._foreach_lerp_(target, [s.detach() for s in source], 1.0 - m)

    def forward(self, *args, **kwargs):
        return self.target(*args, **kwargs)
