"""What a dataset plugin returns: image sources for train and test, and how to augment them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from suncet.augment import AugmentRecipe
from suncet.image_batch import ImageBatch
from suncet.transfer import to_device


@runtime_checkable
class ImageSource(Protocol):
    """Indexed images of one split: ``load`` returns a uint8 batch [b, C, H, W], or an
    ``ImageBatch`` when the images differ in size (image files)."""

    labels: Tensor  # int64 [N]; -1 for unlabeled-only images

    def __len__(self) -> int: ...

    def load(self, indices: Tensor) -> Tensor | ImageBatch: ...


@dataclass
class InMemoryImages:
    """A split held as one decoded uint8 tensor (digits, CIFAR, STL-10)."""

    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor  # int64 [N]
    names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def load(self, indices: Tensor) -> Tensor:
        return self.images[to_device(indices, self.images.device)]

    def to(self, device: torch.device) -> InMemoryImages:
        return InMemoryImages(self.images.to(device), self.labels.to(device), self.names)


@dataclass
class ImageDataset:
    """Everything the engine needs from a dataset plugin."""

    name: str
    train: ImageSource
    test: ImageSource
    num_classes: int
    channels: int
    image_size: int  # side of the stored square images; for image files of any size, the global crop's
    recipe: AugmentRecipe
    class_names: list[str] = field(default_factory=list)
    # Extra images for the unlabeled stream only (STL-10's unlabeled split).
    extra_unlabeled: ImageSource | None = None
