"""Parameter groups and the learning-rate schedule shared by every optimizer plugin."""

from __future__ import annotations

import math

from torch import nn

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases plus normalisation parameters
    (neither), told apart by the module that owns them, not by their names."""
    exempt: set[int] = set()
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            exempt.update(id(p) for p in module.parameters(recurse=False))
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            exempt.add(id(bias))
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay, "lars_exclude": False},
        {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0, "lars_exclude": True},
    ]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, start: float, final: float) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then cosine to ``final``
    at ``total_steps`` (the warm-up is counted once: the decay spans the remaining steps)."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))
