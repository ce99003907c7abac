"""Where a library argument enters the losses: each kind of argument is checked by one function
here, which every loss module calls, so that a new loss inherits the same refusals.

Every refusal is a ``ValueError`` that names the argument as the caller wrote it. Floating
point values may be Python numbers, NumPy scalars or one-element tensors; booleans are never
numbers. Embeddings are real floating-point tensors. Labels are integer tensors: the
contrastive losses only compare them for equality, so any integer, a negative one included, is
a class of its own; where labels index classes (one-hot rows) they must lie in [0, classes).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from suncet.errors import shown

# The fused kernels hold similarities over the temperature in fp32: logits up to 1 / tau are
# resolved to 2^-24 of their size, and the exponentials of the gradient inherit that error.
# Below this temperature it passes 1e-4 of relative accuracy (docs/losses.md).
MIN_TEMPERATURE = 1e-3


def real_number(name: str, value: object) -> float:
    """``value`` as a float: a Python, NumPy or one-element tensor real number, not a bool."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a real number, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {shown(value)}")
    return float(value)


def temperature(name: str, value: object) -> float:
    """A finite temperature >= MIN_TEMPERATURE."""
    t = real_number(name, value)
    if not math.isfinite(t) or t < MIN_TEMPERATURE:
        raise ValueError(f"{name} must be a finite number >= {MIN_TEMPERATURE:g}, got {shown(value)}")
    return t


def fraction(name: str, value: object, *, high_inclusive: bool = False) -> float:
    f = real_number(name, value)
    if not (0 <= f <= 1 if high_inclusive else 0 <= f < 1):
        raise ValueError(f"{name} must be in [0, 1{']' if high_inclusive else ')'}, got {shown(value)}")
    return f


def integer(name: str, value: object, minimum: int) -> int:
    """A Python or NumPy integer >= ``minimum`` (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {shown(value)}")
    return int(value)


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {shown(value)}")
    return value


def choice(name: str, value: object, options: tuple) -> object:
    if value not in options or isinstance(value, bool):
        names = ", ".join("None" if option is None else repr(option) for option in options)
        raise ValueError(f"{name} must be one of {names}, got {shown(value)}")
    return value


def embeddings(name: str, x: object, *, width: int | None = None) -> Tensor:
    """A real floating-point tensor [rows, D] (``width``: D must match)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a floating-point tensor [rows, dim], got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")
    if width is not None and x.shape[1] != width:
        raise ValueError(f"{name} must have {width} columns like the other embeddings, got {x.shape[1]}")
    return x


def scores(name: str, x: object) -> Tensor:
    """Prototype scores: a real floating-point tensor [rows, prototypes]."""
    return embeddings(name, x)


def class_labels(name: str, labels: object, rows: int, device: torch.device, classes: int | None = None) -> Tensor:
    """Integer labels, one per row, as int64 [rows] on ``device``; with ``classes``, indices in
    [0, classes) (checked on the host: a synchronisation on a GPU)."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a tensor of integer class indices, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"{name} must be 1-D with one class index per row ({rows}), got shape {tuple(labels.shape)}")
    if classes is not None and rows:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise ValueError(f"{name} must be class indices in [0, {classes}), got values from {low} to {high}")
    return labels.to(device=device, dtype=torch.long)
