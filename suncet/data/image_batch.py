"""A batch of images of different sizes (decoded image files), each kept whole."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from suncet.data.transfer import to_device


@dataclass
class ImageBatch:
    """Images of different sizes in one uint8 tensor, each whole: image i fills
    ``pixels[i, :, :h, :w]`` with (h, w) = ``sizes[i]``, zeros beyond. Crop boxes are drawn in
    each image's own (h, w), so the padding is never read."""

    pixels: Tensor  # uint8 [B, C, H, W]: H and W the largest of the batch
    sizes: Tensor  # int64 [B, 2] (height, width), on the host, where crop boxes are drawn

    @classmethod
    def stack(cls, images: Sequence[Tensor]) -> ImageBatch:
        """One batch of [C, h, w] images (at least one, all on one device)."""
        sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.long)
        height, width = sizes.amax(dim=0).tolist()
        pixels = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for out, image in zip(pixels, images):
            out[:, : image.shape[1], : image.shape[2]] = image
        return cls(pixels, sizes)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __iter__(self) -> Iterator[Tensor]:
        """Each image at its own size (views of ``pixels``)."""
        for image, (height, width) in zip(self.pixels, self.sizes.tolist()):
            yield image[:, :height, :width]

    def to(self, device: torch.device) -> ImageBatch:
        return ImageBatch(to_device(self.pixels, device), self.sizes)

    def cpu(self) -> ImageBatch:
        return self.to(torch.device("cpu"))


def images_to(images: Tensor | ImageBatch, device: torch.device) -> Tensor | ImageBatch:
    """A loaded batch on ``device`` (a host batch bound for a GPU through pinned memory)."""
    return images.to(device) if isinstance(images, ImageBatch) else to_device(images, device)
