"""Label subsets: parse ``--labels``, pick a class-stratified seeded subset, save and reload it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from suncet.errors import ConfigError

_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
_PER_CLASS = re.compile(r"^(\d+)/class$")


@dataclass(frozen=True)
class LabelSpec:
    """A parsed ``--labels`` value: a fraction of the training set or a count per class."""

    text: str
    fraction: float | None = None
    per_class: int | None = None

    @property
    def is_empty(self) -> bool:
        return self.fraction == 0.0


def parse_label_spec(text: str) -> LabelSpec:
    """``10%``, ``0.5%``, ``0%``, ``100%`` or ``4/class``; anything else is a ConfigError."""
    value = str(text).strip()
    if m := _PERCENT.match(value):
        percent = float(m.group(1))
        if percent > 100:
            raise ConfigError(f"--labels {text}: a percentage must be between 0% and 100%")
        return LabelSpec(value, fraction=percent / 100)
    if m := _PER_CLASS.match(value):
        count = int(m.group(1))
        if count < 1:
            raise ConfigError(f"--labels {text}: the count per class must be at least 1")
        return LabelSpec(value, per_class=count)
    raise ConfigError(
        f"--labels {text!r} is not a label spec; use a percentage (10%, 1%, 0.5%, 0%, 100%) or a count per class (4/class)"
    )


def _stratified_counts(class_sizes: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` over classes in proportion to their sizes, at least one each when it allows."""
    present = class_sizes > 0
    counts = np.zeros(len(class_sizes), np.int64)
    if total < present.sum():
        counts[rng.choice(np.flatnonzero(present), size=total, replace=False)] = 1
        return counts
    counts[present] = 1
    remaining = total - counts.sum()
    room = class_sizes - counts
    if remaining > 0:
        ideal = room / room.sum() * remaining
        whole = np.floor(ideal).astype(np.int64)
        counts += whole
        # Largest remainders take what is left; a tiny random key breaks ties.
        order = np.argsort(-(ideal - whole + rng.random(len(ideal)) * 1e-9))
        counts[order[: remaining - whole.sum()]] += 1
    return counts


def select_labeled(labels: Tensor, spec: LabelSpec, num_classes: int, seed: int) -> Tensor:
    """Sorted indices of the labeled subset of a training split with ``labels`` (-1 = unlabeled)."""
    y = labels.cpu().numpy()
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in range(num_classes)]
    sizes = np.array([len(ix) for ix in by_class])
    if spec.per_class is not None:
        short = [c for c in range(num_classes) if 0 < sizes[c] < spec.per_class]
        if short:
            raise ConfigError(
                f"--labels {spec.text}: class {short[0]} has only {sizes[short[0]]} training images "
                f"(at most {int(sizes[sizes > 0].min())}/class possible)"
            )
        counts = np.minimum(sizes, spec.per_class)
    else:
        assert spec.fraction is not None
        counts = _stratified_counts(sizes, int(round(spec.fraction * sizes.sum())), rng)
    chosen = [rng.choice(ix, size=k, replace=False) for ix, k in zip(by_class, counts) if k > 0]
    if not chosen:
        return torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.sort(np.concatenate(chosen))).long()


def write_labels(path: Path, indices: Tensor, spec_text: str) -> None:
    lines = [f"# labeled training indices for --labels {spec_text}", *map(str, indices.tolist())]
    Path(path).write_text("\n".join(lines) + "\n")


def read_index_file(path: Path, train_size: int) -> Tensor:
    """Training indices, one per line ('#' comments allowed); an unknown index is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"label file {path} does not exist")
    indices = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.lstrip("-").isdigit():
            raise ConfigError(f"{path}:{number}: expected a training index, got {line!r}")
        index = int(line)
        if not 0 <= index < train_size:
            raise ConfigError(f"{path}:{number}: index {index} is outside the training set (0..{train_size - 1})")
        indices.append(index)
    if len(set(indices)) != len(indices):
        raise ConfigError(f"{path}: an index is listed twice")
    return torch.tensor(sorted(indices), dtype=torch.long)
