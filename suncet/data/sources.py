"""What a dataset plugin returns: image sources for train and test, and how to augment them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from suncet.data.image_batch import ImageBatch
from suncet.data.recipe import AugmentRecipe
from suncet.data.transfer import to_device


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


class ConcatImages:
    """Two sources read as one: the training images followed by extra unlabeled images."""

    def __init__(self, first: ImageSource, second: ImageSource):
        self.first, self.second = first, second
        self.labels = torch.cat([first.labels, second.labels])

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def load(self, indices: Tensor) -> Tensor:
        n = len(self.first)
        in_first = indices < n
        images_first = self.first.load(indices[in_first])
        out = images_first.new_empty((len(indices), *images_first.shape[1:]))
        # Positions found on the host: a boolean mask on a GPU would synchronise to count them.
        for where, images in ((in_first, images_first), (~in_first, self.second.load(indices[~in_first] - n))):
            out.index_copy_(0, to_device(where.nonzero().squeeze(1), out.device), to_device(images, out.device))
        return out


def on_device(source: ImageSource, device: torch.device) -> ImageSource:
    """``source`` on the training device where it is decoded in memory: a step then never waits on a copy."""
    return source.to(device) if isinstance(source, InMemoryImages) else source
