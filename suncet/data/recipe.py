"""What an augmentation is made of: a dataset's recipe, and the per-view parameter table.

The table (``ViewColumn``) is the one format shared by the PyTorch path (augment.py), the
Triton kernels (augment_triton.py) and nothing else: each view's random draws as one float32
row, so a batch's parameters reach the device in one copy.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

from suncet.config import NotOfType, typed
from suncet.errors import ConfigError, shown


@dataclass(frozen=True)
class CropSpec:
    """One kind of crop: output size and the area fraction range of RandomResizedCrop."""

    size: int
    scale: tuple[float, float]


@dataclass(frozen=True)
class AugmentRecipe:
    """A dataset's augmentation recipe (method.md section 5)."""

    global_crop: CropSpec
    local_crop: CropSpec
    color_strength: float
    blur_p: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    solarize_p: float = 0.0
    color_p: float = 0.8
    grayscale_p: float = 0.2
    flip_p: float = 0.5
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def normalisation(self) -> dict[str, list[float]]:
        """The per-channel mean and std (of 0..1 pixels) a network trained with this recipe expects."""
        return {"mean": list(self.mean), "std": list(self.std)}


def override_recipe(recipe: AugmentRecipe, overrides: dict) -> AugmentRecipe:
    """A recipe with some fields replaced: ``global_crop_size``, ``global_crop_scale``,
    ``local_crop_size``, ``local_crop_scale`` or any scalar/pair field of the recipe."""
    values = dict(overrides)
    crops = {}
    for which in ("global", "local"):
        crop = getattr(recipe, f"{which}_crop")
        size = values.pop(f"{which}_crop_size", crop.size)
        scale = values.pop(f"{which}_crop_scale", crop.scale)
        if not (isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 65536):
            raise ConfigError(f"augment option {which}_crop_size must be a positive integer, got {shown(size)}")
        bounds = [_number(v) for v in scale] if isinstance(scale, (list, tuple)) and len(scale) == 2 else []
        if not (len(bounds) == 2 and None not in bounds and 0 < bounds[0] <= bounds[1] <= 1):
            raise ConfigError(
                f"augment option {which}_crop_scale must be [low, high] with 0 < low <= high <= 1, got {shown(scale)}"
            )
        crops[f"{which}_crop"] = CropSpec(size, (bounds[0], bounds[1]))
    fields = {f.name: f for f in dataclasses.fields(AugmentRecipe)}
    for key, value in values.items():
        if key not in fields or key in crops:
            known = ["global_crop_size", "global_crop_scale", "local_crop_size", "local_crop_scale"]
            known += [n for n in fields if not n.endswith("_crop")]
            raise ConfigError(f"unknown augment option '{key}'; known: {', '.join(known)}")
        current, given = getattr(recipe, key), value
        if isinstance(current, tuple):
            numbers = (
                [_number(v) for v in value] if isinstance(value, (list, tuple)) and len(value) == len(current) else []
            )
            if len(numbers) != len(current) or not all(v is not None and math.isfinite(v) for v in numbers):
                raise ConfigError(
                    f"augment option {key} must be a list of {len(current)} finite numbers, got {shown(given)}"
                )
            value = tuple(numbers)
        else:
            value = _number(value)
            if value is None or not 0 <= value < math.inf:
                raise ConfigError(f"augment option {key} must be a finite non-negative number, got {shown(given)}")
        if key.endswith("_p") and value > 1:
            raise ConfigError(f"augment option {key} is a probability, got {shown(value)}")
        crops[key] = value
    return dataclasses.replace(recipe, **crops)


def _number(value: object) -> float | None:
    try:
        return typed(value, float)
    except NotOfType:
        return None


def blur_kernel_size(size: int) -> int:
    """SimCLR's kernel: 10% of the crop side, odd, at least 3."""
    k = max(3, int(round(0.1 * size)))
    return k if k % 2 else k + 1


class ViewColumn(enum.IntEnum):
    """Columns of a view parameter table: one float32 row of random draws per sample."""

    TOP = 0  # the crop box, in pixels
    LEFT = 1
    HEIGHT = 2
    WIDTH = 3
    FLIP = 4  # flags: 1 where the step applies to the sample, 0 where not (or not in the recipe)
    APPLY_JITTER = 5
    FACTORS = 6  # four columns: brightness, contrast, saturation blend factors, 1 (hue blends nothing)
    HUE = 10  # hue shift, fraction of a turn
    ORDER = 11  # four columns: the jitter step (0 brightness ... 3 hue) of each slot
    GRAY = 15
    BLUR = 16
    SIGMA = 17
    SOLARIZE = 18


VIEW_COLUMNS = 19
