"""The data path: image sources, augmentation recipes, label subsets, samplers and pipelines.

A dataset plugin returns an ``ImageDataset`` (sources.py) with an ``AugmentRecipe``
(recipe.py); the engine draws the labeled subset (labels.py), plans each step's images
(samplers.py) and hands the plans to a ``Pipeline`` (pipeline.py: batched on the training
device; worker_pipeline.py: torchvision per image in loader processes), which yields each step's
``TrainBatch`` (batch.py).
"""

from suncet.data.batch import TrainBatch
from suncet.data.recipe import AugmentRecipe, CropSpec
from suncet.data.sources import ConcatImages, ImageDataset, ImageSource, InMemoryImages

__all__ = ["AugmentRecipe", "ConcatImages", "CropSpec", "ImageDataset", "ImageSource", "InMemoryImages", "TrainBatch"]
