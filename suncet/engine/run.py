"""A training run: what ``assemble`` (assemble.py) builds from a config, and every part of the
engine works on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from suncet.config import TrainConfig
from suncet.data import ImageDataset, ImageSource
from suncet.data.samplers import ClassStratifiedSampler, UnlabeledSampler
from suncet.methods import Method


@dataclass
class Run:
    """A training run assembled from its config: data, labeled subset, model and optimizer."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    dataset: ImageDataset
    labeled: Tensor  # indices into dataset.train
    method: Method
    optimizer: torch.optim.Optimizer
    unlabeled: ImageSource
    train_images: ImageSource  # the training split where the pipeline reads it (labeled images)
    unlabeled_sampler: UnlabeledSampler
    labeled_sampler: ClassStratifiedSampler | None
    backbone_args: dict  # what builds the backbone again without the dataset (load_backbone)
    adapted: list[str]  # settings fitted to the data (engine/fit.py), to report once
