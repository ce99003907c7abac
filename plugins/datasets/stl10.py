"""STL-10 from its binary release: 96x96 colour, 10 classes, 5,000 labeled training images, 8,000
test images and 100,000 unlabeled images that join the unlabeled stream only.

``--data DIR`` is the extracted ``stl10_binary`` folder or the folder holding it. The labeled
splits are decoded into memory; the unlabeled split (2.7 GB) stays on disk and is memory-mapped
in each process that reads it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from suncet.data import ImageDataset, InMemoryImages
from suncet.data.recipe import AugmentRecipe, CropSpec
from suncet.errors import ConfigError
from suncet.registry import register_dataset

FOLDER = "stl10_binary"
IMAGE_SIDE = 96
BYTES_PER_IMAGE = 3 * IMAGE_SIDE * IMAGE_SIDE
NUM_CLASSES = 10
DEFAULT_DOWNLOAD_ROOT = "data"

# ImageNet-like photographs at 96 px: ImageNet's recipe (strength 1, blur) with the crop at the
# stored size. Local crops take SwAV's local area range; their side is SwAV's local/global ratio
# (96/224 of 96 px = 41 px) rounded up to a multiple of 16.
RECIPE = AugmentRecipe(
    global_crop=CropSpec(IMAGE_SIDE, (0.08, 1.0)),
    local_crop=CropSpec(48, (0.05, 0.14)),
    color_strength=1.0,
    blur_p=0.5,
    # Per-channel mean and std over the training split's pixels (the published values).
    mean=(0.4467, 0.4398, 0.4066),
    std=(0.2603, 0.2566, 0.2713),
)


def _to_nchw(raw: np.ndarray) -> Tensor:
    # Each image is stored column-major per channel: [N, C, W, H] in row-major terms.
    return torch.from_numpy(np.ascontiguousarray(raw.reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 1, 3, 2)))


def _image_count(path: Path) -> int:
    if not path.is_file():
        raise ConfigError(f"{path} is missing: expected an STL-10 image file of the binary release")
    size = path.stat().st_size
    if size % BYTES_PER_IMAGE:
        raise ConfigError(
            f"{path} has {size} bytes, not a multiple of {BYTES_PER_IMAGE} (3 x 96 x 96 per image): truncated or not STL-10"
        )
    return size // BYTES_PER_IMAGE


def _read_labels(path: Path, count: int) -> Tensor:
    if not path.is_file():
        raise ConfigError(f"{path} is missing: expected the labels of the STL-10 binary release")
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if labels.size != count:
        raise ConfigError(f"{path} holds {labels.size} labels for {count} images")
    if labels.size and not (labels.min() >= 1 and labels.max() <= NUM_CLASSES):
        raise ConfigError(f"{path}: labels must lie in 1..{NUM_CLASSES}, found {labels.min()}..{labels.max()}")
    return torch.from_numpy(labels - 1)


def _read_split(folder: Path, split: str) -> InMemoryImages:
    images_path = folder / f"{split}_X.bin"
    count = _image_count(images_path)
    labels = _read_labels(folder / f"{split}_y.bin", count)
    return InMemoryImages(_to_nchw(np.fromfile(images_path, dtype=np.uint8)), labels)


class MappedImages:
    """STL-10's unlabeled split, read from disk on demand (labels all -1).

    The memory map opens lazily and is dropped when pickled, so loader workers each map the
    file themselves instead of receiving a copy of it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.labels = torch.full((_image_count(self.path),), -1, dtype=torch.long)
        self._images: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: Tensor) -> Tensor:
        if self._images is None:
            self._images = np.memmap(self.path, dtype=np.uint8, mode="r").reshape(-1, BYTES_PER_IMAGE)
        # Sorted reads touch the file in order; the result is put back in the requested order.
        wanted = indices.cpu().numpy()
        order = np.argsort(wanted, kind="stable")
        raw = np.empty((len(wanted), BYTES_PER_IMAGE), dtype=np.uint8)
        raw[order] = self._images[wanted[order]]
        return _to_nchw(raw)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}


def _locate(root: Path) -> Path:
    for candidate in (root, root / FOLDER):
        if (candidate / "train_X.bin").is_file():
            return candidate
    raise ConfigError(
        f"no STL-10 data in {root}: expected {root / FOLDER}/ (or {root}/ itself) holding train_X.bin, train_y.bin, "
        "test_X.bin, test_y.bin, unlabeled_X.bin and class_names.txt; pass --download to fetch it"
    )


def _download(root: Path) -> None:
    import torchvision.datasets

    try:
        torchvision.datasets.STL10(str(root), split="train", download=True)
    except Exception as exc:  # network, disk and checksum failures all end the same way for the user
        raise ConfigError(
            f"could not download STL-10 into {root} ({type(exc).__name__}: {exc}); without a network, extract "
            f"stl10_binary.tar.gz there by hand and pass --data {root}"
        ) from None


@register_dataset("stl10", description="STL-10, 96x96 colour, 10 classes + 100k unlabeled (binary release; --data DIR)")
def stl10(*, root: str | None = None, download: bool = False) -> ImageDataset:
    if root is None and not download:
        raise ConfigError(f"dataset stl10 needs --data DIR (the folder holding {FOLDER}/) or --download")
    directory = Path(root if root is not None else DEFAULT_DOWNLOAD_ROOT).expanduser()
    if download:
        _download(directory)
    folder = _locate(directory)
    names_path = folder / "class_names.txt"
    if not names_path.is_file():
        raise ConfigError(f"{names_path} is missing: expected the {NUM_CLASSES} class names, one a line")
    class_names = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
    if len(class_names) != NUM_CLASSES:
        raise ConfigError(f"{names_path}: expected {NUM_CLASSES} class names, found {len(class_names)}")
    return ImageDataset(
        name="stl10",
        train=_read_split(folder, "train"),
        test=_read_split(folder, "test"),
        num_classes=NUM_CLASSES,
        channels=3,
        image_size=IMAGE_SIDE,
        recipe=RECIPE,
        class_names=class_names,
        extra_unlabeled=MappedImages(folder / "unlabeled_X.bin"),
    )
