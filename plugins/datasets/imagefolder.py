"""Images in class folders, ImageNet's layout: ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/...``.

Images are decoded when a batch is loaded (in the loader's worker processes with the worker
pipeline), with torchvision.io, and kept whole: RandomResizedCrop draws its boxes from the whole
image, as torchvision does. Only an image whose short side exceeds ``size`` is shrunk to it,
aspect kept (a batch is padded to its largest height and width, so the cap bounds its memory).
A batch is an ``ImageBatch`` of the images at their own sizes. With ``decode_device="cuda"``
JPEG files are decoded in one batched call on the GPU (nvJPEG) and the batch is returned on the
GPU: for the device pipeline, whose augmentation runs there.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Annotated

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.datasets.folder import find_classes, make_dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as TF

from suncet.data import ImageDataset
from suncet.data.image_batch import ImageBatch
from suncet.data.recipe import AugmentRecipe, CropSpec
from suncet.errors import ConfigError, shown
from suncet.registry import Range, register_dataset

# The formats torchvision.io decodes (make_dataset compares lower-cased suffixes).
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
JPEG_MAGIC = b"\xff\xd8"
DECODE_DEVICES = ("cpu", "cuda")
# Short sides above this are shrunk to it at decode time, the whole image kept: a typical
# ImageNet photograph (500 x 375) stays as decoded, and a multi-megapixel one does not pad every
# image of its batch to its size.
MAX_SHORT_SIDE = 512
# An image whose header declares more pixels is refused before decoding (PIL's own default
# bound on decompression bombs); the dataset option max_pixels raises it.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS

# method.md section 5 (ImageNet): RandomResizedCrop(224, 0.08-1), flip, jitter strength 1 with
# p 0.8, grayscale p 0.2, blur (sigma 0.1-2) p 0.5; SwAV's local crops 96 px, area 0.05-0.14.
# Mean and std are ImageNet's per-channel values.
RECIPE = AugmentRecipe(
    global_crop=CropSpec(224, (0.08, 1.0)),
    local_crop=CropSpec(96, (0.05, 0.14)),
    color_strength=1.0,
    blur_p=0.5,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)


class FolderImages:
    """One split of an image folder: file names relative to ``root``, decoded on ``load``."""

    def __init__(
        self,
        root: Path,
        names: list[str],
        labels: Tensor,
        size: int | None,
        decode_device: str = "cpu",
        max_pixels: int = MAX_PIXELS,
    ):
        self.root = Path(root)
        self.names = names
        self.labels = labels
        self.size = size
        self.decode_device = decode_device
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.names)

    def _read(self, name: str) -> Tensor:
        try:
            data = read_file(str(self.root / name))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"cannot read image {self.root / name}: {exc}") from None
        self._check_pixels(name, data)
        return data

    def _check_pixels(self, name: str, data: Tensor) -> None:
        """Refuse an image whose header declares more than ``max_pixels``, before it is decoded:
        a small file must not decode to gigabytes."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(data.numpy().tobytes())) as header:
                    width, height = header.size
            except Image.DecompressionBombError:  # beyond PIL's own hard bound, which no option lifts
                raise ConfigError(
                    f"image {self.root / name} declares more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels "
                    "(PIL's bound on decompression bombs); it is not decoded"
                ) from None
            except (UnidentifiedImageError, OSError):
                return  # not identified from its header: decoding reports what is wrong with it
        if width * height > self.max_pixels:
            raise ConfigError(
                f"image {self.root / name} declares {width} x {height} pixels, more than max_pixels "
                f"{self.max_pixels:,}; raise it with --dataset-opt max_pixels=N if the image is genuine"
            )

    def _decode(self, name: str, data: Tensor) -> Tensor:
        try:
            return decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise ConfigError(f"cannot decode image {self.root / name}: {exc}") from None

    def _fit(self, image: Tensor) -> Tensor:
        """The whole image; its short side shrunk to ``size`` (antialiased) when longer."""
        if self.size is None or min(image.shape[-2:]) <= self.size:
            return image
        return TF.resize(image, [self.size], antialias=True)

    def load(self, indices: Tensor) -> ImageBatch:
        names = [self.names[i] for i in indices.tolist()]
        data = [self._read(name) for name in names]
        if self.decode_device == "cpu":
            return ImageBatch.stack([self._fit(self._decode(name, d)) for name, d in zip(names, data)])
        is_jpeg = [bytes(d[:2].tolist()) == JPEG_MAGIC for d in data]
        decoded: list[Tensor | None] = [None] * len(names)
        jpegs = [i for i, flag in enumerate(is_jpeg) if flag]
        if jpegs:
            try:
                on_gpu = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=self.decode_device)
            except RuntimeError:
                # The batched call names no file: decode one by one to find the broken one.
                on_gpu = [self._decode(names[i], data[i]).to(self.decode_device) for i in jpegs]
            for i, image in zip(jpegs, on_gpu):
                decoded[i] = image
        for i, flag in enumerate(is_jpeg):
            if not flag:
                decoded[i] = self._decode(names[i], data[i]).to(self.decode_device, non_blocking=True)
        return ImageBatch.stack([self._fit(image) for image in decoded])


def _scan(directory: Path, class_to_idx: dict[str, int], require_every_class: bool) -> tuple[list[str], Tensor]:
    try:
        samples = make_dataset(str(directory), class_to_idx, extensions=EXTENSIONS, allow_empty=not require_every_class)
    except FileNotFoundError as exc:
        raise ConfigError(f"{directory}: {exc}") from None
    if not samples:
        raise ConfigError(f"{directory} holds no images ({', '.join(EXTENSIONS)}) in its class folders")
    names = [Path(os.path.relpath(path, directory)).as_posix() for path, _ in samples]
    return names, torch.tensor([label for _, label in samples], dtype=torch.long)


def _classes(directory: Path) -> tuple[list[str], dict[str, int]]:
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory: expected one folder of images per class in it")
    try:
        return find_classes(str(directory))
    except FileNotFoundError:
        raise ConfigError(f"{directory} holds no class folders: expected {directory}/<class>/<image files>") from None


@register_dataset(
    "imagefolder", description="class folders DIR/train/<class>/*.jpg and DIR/val/<class>/ (ImageNet); --data DIR"
)
def imagefolder(
    *,
    root: str | None = None,
    download: bool = False,
    size: int | None = MAX_SHORT_SIDE,
    decode_device: str = "cpu",
    max_pixels: Annotated[int, Range(1)] = MAX_PIXELS,
) -> ImageDataset:
    if download:
        raise ConfigError("dataset imagefolder cannot be downloaded: pass --data DIR holding train/ and val/")
    if root is None:
        raise ConfigError("dataset imagefolder needs --data DIR holding train/<class>/ and val/<class>/ image folders")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        raise ConfigError(f"imagefolder option size must be a positive integer (or null: no cap), got {shown(size)}")
    if decode_device not in DECODE_DEVICES:
        raise ConfigError(
            f"imagefolder option decode_device must be one of {', '.join(DECODE_DEVICES)}, got {shown(decode_device)}"
        )
    if decode_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("imagefolder option decode_device=cuda: no CUDA device is available here")
    directory = Path(root).expanduser()
    train_dir, val_dir = directory / "train", directory / "val"
    class_names, class_to_idx = _classes(train_dir)
    val_classes, _ = _classes(val_dir)
    unknown = sorted(set(val_classes) - set(class_names))
    if unknown:
        raise ConfigError(f"{val_dir / unknown[0]}: class '{unknown[0]}' has no folder in {train_dir}")
    train_names, train_labels = _scan(train_dir, class_to_idx, require_every_class=True)
    val_names, val_labels = _scan(val_dir, class_to_idx, require_every_class=False)
    return ImageDataset(
        name="imagefolder",
        train=FolderImages(train_dir, train_names, train_labels, size, decode_device, max_pixels),
        test=FolderImages(val_dir, val_names, val_labels, size, decode_device, max_pixels),
        num_classes=len(class_names),
        channels=3,
        image_size=RECIPE.global_crop.size,
        recipe=RECIPE,
        class_names=class_names,
    )
