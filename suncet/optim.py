"""Parameter groups, the learning-rate schedule, and where a run's learning rates come from
(the linear scaling rule), shared by every optimizer plugin."""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from suncet.config import RATES, TrainConfig
from suncet.errors import ConfigError

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


def global_batch(config: TrainConfig, world_size: int) -> int:
    """The global batch of ``config`` on ``world_size`` processes, counted as its ``lr_batch_counts`` says."""
    per_process = config.batch_size
    if config.lr_batch_counts == "views":
        labeled = config.classes_per_step * config.images_per_class if config.suncet_weight > 0 else 0
        per_process = 2 * config.batch_size + labeled
    return world_size * per_process


def scale_learning_rates(config: TrainConfig, world_size: int, given: frozenset[str] = frozenset()) -> TrainConfig:
    """Where a run's learning rates come from: the linear scaling rule, applied once, to the
    batch the run has (engine/fit.py calls it after fitting the batch to the data).

    ``config``'s rates (lr, start_lr, final_lr) are stated for a global batch of ``lr_batch``;
    a run uses each times its own global batch (``global_batch``) over ``lr_batch``, and records
    its own batch as ``lr_batch``, so a saved config scales to itself. ``given`` names the
    settings the user gave: a rate given without ``lr_batch`` is already the run's own and is
    used as given; with ``lr_batch`` None every rate is.
    """
    if config.lr_batch is None:
        return config
    keep = frozenset() if "lr_batch" in given else given & set(RATES)
    batch = global_batch(config, world_size)
    scaled = {key: getattr(config, key) * (1 if key in keep else batch / config.lr_batch) for key in RATES}
    for key, value in scaled.items():
        if not math.isfinite(value):
            raise ConfigError(
                f"{key.replace('_', '-')} scaled to a global batch of {batch} is {value}; state a smaller rate"
            )
    return dataclasses.replace(config, **scaled, lr_batch=batch)
