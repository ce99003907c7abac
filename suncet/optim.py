"""Parameter groups, the learning-rate schedule, and where a run's learning rates come from
(the linear scaling rule), shared by every optimizer plugin."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from torch import nn

from suncet.errors import ConfigError

if TYPE_CHECKING:
    from suncet.config import TrainConfig

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


RATES = ("lr", "start_lr", "final_lr")
# What a global batch counts for learning-rate scaling: the unlabeled images of a step, or its
# views (two per unlabeled image, plus one per labeled image while the labeled term is on).
LR_BATCH_COUNTS = ("unlabeled", "views")


def global_batch(config: TrainConfig, world_size: int) -> int:
    """The global batch of ``config`` on ``world_size`` processes, counted as its ``lr_batch_counts`` says."""
    per_process = config.batch_size
    if config.lr_batch_counts == "views":
        labeled = config.classes_per_step * config.images_per_class if config.suncet_weight > 0 else 0
        per_process = 2 * config.batch_size + labeled
    return world_size * per_process


def scale_learning_rates(config: TrainConfig, world_size: int, keep: frozenset[str] = frozenset()) -> TrainConfig:
    """Where a run's learning rates come from: the linear scaling rule.

    ``config``'s rates (lr, start_lr, final_lr) are stated for a global batch of ``lr_batch``;
    a run uses each times its own global batch (``global_batch``) over ``lr_batch``, and records
    its own batch as ``lr_batch``, so scaling a scaled config again changes nothing. The engine
    scales once more after the batch is fitted to the data (engine/fit.py). Rates in ``keep``
    are already the run's own (an --lr given without --lr-batch); with ``lr_batch`` None the
    rates are used as given.
    """
    if config.lr_batch is None:
        return config
    batch = global_batch(config, world_size)
    scaled = {key: getattr(config, key) * (1 if key in keep else batch / config.lr_batch) for key in RATES}
    for key, value in scaled.items():
        if not math.isfinite(value):
            raise ConfigError(f"{key.replace('_', '-')} scaled to a global batch of {batch} is {value}; state a smaller rate")
    return dataclasses.replace(config, **scaled, lr_batch=batch)
