"""scikit-learn's bundled handwritten digits: 1,797 8x8 grayscale images, 10 classes, no download."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from suncet.data import ImageDataset, InMemoryImages
from suncet.data.recipe import AugmentRecipe, CropSpec
from suncet.registry import register_dataset

SPLIT_SEED = 0
TEST_FRACTION = 0.2

# Digits are not mirror-symmetric (a flipped 2 is no 2) and 8 px leave no room for blur;
# crops keep most of the glyph, and only brightness/contrast jitter applies to one channel.
RECIPE = AugmentRecipe(
    global_crop=CropSpec(size=8, scale=(0.5, 1.0)),
    local_crop=CropSpec(size=6, scale=(0.2, 0.5)),
    color_strength=0.5,
    blur_p=0.0,
    flip_p=0.0,
    grayscale_p=0.0,
    mean=(0.3,),
    std=(0.4,),
)


@register_dataset("digits", description="scikit-learn digits, 8x8 grayscale, 10 classes (bundled, default)")
def digits(*, root: str | None = None, download: bool = False) -> ImageDataset:
    bunch = load_digits()
    # Pixel values are counts 0..16; scaled to the usual 0..255 of uint8 images.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)

    def split(ix: np.ndarray) -> InMemoryImages:
        return InMemoryImages(torch.from_numpy(images[ix]), torch.from_numpy(labels[ix]))

    return ImageDataset(
        name="digits",
        train=split(train_idx),
        test=split(test_idx),
        num_classes=10,
        channels=1,
        image_size=8,
        recipe=RECIPE,
        class_names=[str(d) for d in range(10)],
    )
