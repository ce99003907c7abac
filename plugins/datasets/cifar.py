"""CIFAR-10 and CIFAR-100 from the python-pickle release, decoded once into uint8 tensors in memory.

``--data DIR`` is the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or the
folder holding it; ``--download`` fetches and extracts the archive there with torchvision's
downloader.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from suncet.data import ImageDataset, InMemoryImages
from suncet.data.recipe import AugmentRecipe, CropSpec
from suncet.errors import ConfigError
from suncet.registry import register_dataset

IMAGE_SIDE = 32
PIXELS_PER_IMAGE = 3 * IMAGE_SIDE * IMAGE_SIDE
DEFAULT_DOWNLOAD_ROOT = "data"


def cifar_recipe(mean: tuple[float, ...], std: tuple[float, ...]) -> AugmentRecipe:
    """method.md section 5 for CIFAR: crop 32, colour strength 0.5, no blur. The crop's area range is
    SimCLR's CIFAR setting and the paper's reference code (RandomResizedCrop(32), i.e. 0.08-1);
    local crops are 16 px with SwAV's local area range 0.05-0.14."""
    return AugmentRecipe(
        global_crop=CropSpec(IMAGE_SIDE, (0.08, 1.0)),
        local_crop=CropSpec(16, (0.05, 0.14)),
        color_strength=0.5,
        blur_p=0.0,
        mean=mean,
        std=std,
    )


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR release keeps its files and the keys of its pickles."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    torchvision_class: str
    # Per-channel mean and std over all training pixels (the published values of each release).
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarLayout(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    torchvision_class="CIFAR10",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)

CIFAR100 = CifarLayout(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    torchvision_class="CIFAR100",
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2, restricted to that one use."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(
            f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a latin1 bytes object"
        )
    return text.encode("latin1")


# The function numpy pickles arrays with, whichever module the installed numpy names it in.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]

# Every global the CIFAR python release needs: numpy's array reconstruction (numpy.core before
# numpy 2, numpy._core since), and the latin1 ``_codecs.encode`` that Python 3 writes for bytes
# (files re-saved with protocol 2). Dicts, lists, strings and ints need no global.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _RefusedGlobal(Exception):
    """A pickle naming a callable the CIFAR release does not use: never imported, never called."""


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of the CIFAR release")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _unpickle(path: Path) -> dict:
    """A CIFAR pickle through an unpickler that builds only dicts, lists, strings, numbers and
    numpy arrays: a file is data, so one that asks for any other callable is refused unread."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing: expected a file of the CIFAR python release")
    try:
        with open(path, "rb") as handle:
            content = _CifarUnpickler(handle, encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise ConfigError(
            f"{path} is not a CIFAR python pickle: it asks for {exc}, which the release never does (refused, nothing was run)"
        ) from None
    except Exception as exc:  # a truncated or foreign file fails in many ways inside pickle
        raise ConfigError(f"{path} is not a CIFAR python pickle ({_one_line(exc)})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path} is not a CIFAR python pickle: it holds a {type(content).__name__}, expected a dict")
    # Files re-saved from Python 3 after loading with encoding="bytes" have bytes keys and names.
    return {_text(key): value for key, value in content.items()}


def _text(value):
    return value.decode("latin1") if isinstance(value, bytes) else value


def _read_split(paths: list[Path], layout: CifarLayout) -> InMemoryImages:
    images, labels = [], []
    for path in paths:
        content = _unpickle(path)
        missing = [key for key in ("data", layout.label_key) if key not in content]
        if missing:
            raise ConfigError(f"{path} has no '{missing[0]}' entry: expected keys 'data' and '{layout.label_key}'")
        # Both are checked as they were read, before any conversion: a list whose entries all
        # refer to one row would become an array far larger than the file (the file's size bounds
        # an array's bytes, not a list's references).
        data = content["data"]
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != PIXELS_PER_IMAGE
        ):
            found = (
                f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
            )
            raise ConfigError(f"{path}: 'data' is {found}, expected uint8 [N, {PIXELS_PER_IMAGE}]")
        y = _labels(content[layout.label_key], path, layout.label_key)
        if y.shape != (data.shape[0],):
            raise ConfigError(f"{path}: {data.shape[0]} images but {y.size} labels")
        if y.size and not (0 <= y.min() and y.max() < layout.num_classes):
            raise ConfigError(f"{path}: labels must lie in 0..{layout.num_classes - 1}, found {y.min()}..{y.max()}")
        images.append(data.reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE))
        labels.append(y)
    return InMemoryImages(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _labels(value: object, path: Path, key: str) -> np.ndarray:
    """A split's labels: a list of integers (the release's form) or a 1-D integer array."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.integer):
        return value.astype(np.int64)
    if isinstance(value, list) and all(type(v) is int for v in value):
        try:
            return np.array(value, dtype=np.int64)
        except OverflowError:
            raise ConfigError(f"{path}: '{key}' holds an integer too large to be a class") from None
    raise ConfigError(f"{path}: '{key}' is not a list of class numbers")


def _locate(root: Path, layout: CifarLayout) -> Path:
    for candidate in (root, root / layout.folder):
        if (candidate / layout.meta_file).is_file():
            return candidate
    raise ConfigError(
        f"no {layout.name} data in {root}: expected {root / layout.folder}/ (or {root}/ itself) holding "
        f"{', '.join([*layout.train_files, layout.test_file, layout.meta_file])}; pass --download to fetch it"
    )


def _download(root: Path, layout: CifarLayout) -> None:
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, layout.torchvision_class)(str(root), train=True, download=True)
    except Exception as exc:  # network, disk and checksum failures all end the same way for the user
        raise ConfigError(
            f"could not download {layout.name} into {root} ({type(exc).__name__}: {exc}); without a network, "
            f"extract the python release there by hand and pass --data {root}"
        ) from None


def load_cifar(layout: CifarLayout, root: str | None, download: bool) -> ImageDataset:
    if root is None and not download:
        raise ConfigError(f"dataset {layout.name} needs --data DIR (the folder holding {layout.folder}/) or --download")
    directory = Path(root if root is not None else DEFAULT_DOWNLOAD_ROOT).expanduser()
    if download:
        _download(directory, layout)
    folder = _locate(directory, layout)
    meta = _unpickle(folder / layout.meta_file)
    names = meta.get(layout.names_key, [])
    if not (isinstance(names, list) and all(isinstance(n, (str, bytes)) and len(n) <= 1000 for n in names)):
        raise ConfigError(f"{folder / layout.meta_file}: '{layout.names_key}' is not a list of class names")
    class_names = [_text(name) for name in names]
    if len(class_names) != layout.num_classes:
        raise ConfigError(
            f"{folder / layout.meta_file}: expected {layout.num_classes} names under '{layout.names_key}', "
            f"found {len(class_names)}"
        )
    return ImageDataset(
        name=layout.name,
        train=_read_split([folder / name for name in layout.train_files], layout),
        test=_read_split([folder / layout.test_file], layout),
        num_classes=layout.num_classes,
        channels=3,
        image_size=IMAGE_SIDE,
        recipe=cifar_recipe(layout.mean, layout.std),
        class_names=class_names,
    )


@register_dataset(
    "cifar10", description="CIFAR-10, 32x32 colour, 10 classes (python release; --data DIR or --download)"
)
def cifar10(*, root: str | None = None, download: bool = False) -> ImageDataset:
    return load_cifar(CIFAR10, root, download)


@register_dataset(
    "cifar100", description="CIFAR-100, 32x32 colour, 100 classes (python release; --data DIR or --download)"
)
def cifar100(*, root: str | None = None, download: bool = False) -> ImageDataset:
    return load_cifar(CIFAR100, root, download)
