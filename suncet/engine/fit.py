"""Settings bounded by the data: a setting the user left to its default (or preset) shrinks to
what the dataset allows and says so; one the user gave is refused with the largest that works.

    batch_size         at most the unlabeled images per rank
    classes_per_step   at most the classes that have labeled images

The learning rates are then computed, once, for the fitted global batch (suncet/optim.py, the
linear scaling rule).

``images_per_class`` has no bound: a class with fewer labeled images repeats them within a step
under other augmentations (samplers.py), which keeps SuNCEt's positive pairs in a class that has
a single labeled image; that repetition is reported.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from suncet.config import TrainConfig
from suncet.data import ImageDataset
from suncet.errors import ConfigError
from suncet.optim import scale_learning_rates


def _bounds(dataset: ImageDataset, labeled: Tensor, unlabeled: int, world_size: int) -> dict[str, tuple[int, str]]:
    """Setting -> (largest value that works, what bounds it)."""
    ranks = f" per rank ({world_size} ranks)" if world_size > 1 else ""
    bounds = {"batch_size": (unlabeled // world_size, f"the {unlabeled} unlabeled images of {dataset.name}{ranks}")}
    if len(labeled):
        classes = len(torch.unique(dataset.train.labels[labeled]))
        bounds["classes_per_step"] = (classes, f"the {classes} classes with labeled images in {dataset.name}")
    return bounds


def _repetition_note(config: TrainConfig, dataset: ImageDataset, labeled: Tensor, world_size: int) -> list[str]:
    if not len(labeled):
        return []
    classes, counts = torch.unique(dataset.train.labels[labeled], return_counts=True)
    fewest = int(counts.min()) // world_size
    if fewest >= config.images_per_class:
        return []
    name = dataset.class_names[int(classes[counts.argmin()])] if dataset.class_names else int(classes[counts.argmin()])
    return [
        f"class {name} has {max(fewest, 1)} labeled image(s) per rank, fewer than --images-per-class "
        f"{config.images_per_class}: a step repeats them under other augmentations"
    ]


def fit_to_data(
    config: TrainConfig,
    dataset: ImageDataset,
    labeled: Tensor,
    unlabeled: int,
    world_size: int,
    given: frozenset[str] = frozenset(),
) -> tuple[TrainConfig, list[str]]:
    """``config`` with the settings the user did not give (``given``: see presets.given_keys)
    bounded by the data and its learning rates scaled to the result, and a line per change to
    report."""
    changes, notes = {}, []
    for key, (largest, bound) in _bounds(dataset, labeled, unlabeled, world_size).items():
        value, flag = getattr(config, key), "--" + key.replace("_", "-")
        if value <= largest:
            continue
        if largest < 1:
            raise ConfigError(f"{flag} cannot be served: {bound}")
        if key in given:
            raise ConfigError(f"{flag} {value} is more than {bound}; at most {largest} works")
        changes[key] = largest
        notes.append(f"{flag} {largest} (not {value}): {bound}")
    fitted = scale_learning_rates(dataclasses.replace(config, **changes), world_size, given)
    if changes:
        unfitted = scale_learning_rates(config, world_size, given)
        if fitted.lr != unfitted.lr:
            notes.append(
                f"--lr {fitted.lr:.4g} (not {unfitted.lr:.4g}): the rates follow the global batch, now "
                f"{fitted.lr_batch} ({fitted.lr_batch_counts})"
            )
    return fitted, notes + _repetition_note(fitted, dataset, labeled, world_size)
