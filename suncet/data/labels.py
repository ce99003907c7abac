"""Label subsets: parse ``--labels``, pick a class-stratified seeded subset, save and reload it,
or read a subset file (training indices, or file names as SimCLR's ImageNet 1%/10% lists)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from suncet.errors import ConfigError, shown, what_is_at

if TYPE_CHECKING:
    from suncet.data import ImageDataset

_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
_PER_CLASS = re.compile(r"^(\d+)/class$")


@dataclass(frozen=True)
class LabelSpec:
    """A parsed ``--labels`` value: a fraction of the training set or a count per class."""

    text: str
    fraction: float | None = None
    per_class: int | None = None


def is_label_file(labels: str) -> bool:
    """``--labels`` names a subset file (a path, or a name with an extension) rather than a spec."""
    if re.fullmatch(r"-?[\d.]+%|-?\d+/class", labels.strip()):
        return False
    return "/" in labels or os.sep in labels or bool(re.search(r"\.[A-Za-z]\w*$", labels))


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
        f"--labels {shown(text)} is not a label spec; use a percentage (10%, 1%, 0.5%, 0%, 100%) or a count per class (4/class)"
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


# The first line of every labels.txt suncet writes: one of the marks a run folder is known by
# (engine/rundir.py, ``is_run_directory``).
LABELS_HEADER = "# labeled training indices for --labels "


def labels_text(indices: Tensor, spec_text: str) -> str:
    """A labels.txt: the labeled training indices, one a line, under a comment naming the spec."""
    lines = [f"{LABELS_HEADER}{spec_text}", *map(str, indices.tolist())]
    return "\n".join(lines) + "\n"


def _entries(path: Path) -> list[tuple[int, str]]:
    """(line number, entry) of each non-blank line, '#' comments removed."""
    entries = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"label file {path} is not UTF-8 text (byte {exc.start}): expected one index or file name a line"
        ) from None
    except OSError as exc:
        raise ConfigError(f"label file {path} cannot be read: {exc.strerror}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            entries.append((number, entry))
    return entries


def _indices(path: Path, entries: list[tuple[int, str]], train_size: int) -> Tensor:
    indices = []
    for number, entry in entries:
        if not entry.lstrip("-").isdigit():
            raise ConfigError(f"{path}:{number}: expected a training index, got {shown(entry)}")
        index = int(entry)
        if not 0 <= index < train_size:
            raise ConfigError(f"{path}:{number}: index {index} is outside the training set (0..{train_size - 1})")
        indices.append(index)
    if len(set(indices)) != len(indices):
        raise ConfigError(f"{path}: an index is listed twice")
    return torch.tensor(sorted(indices), dtype=torch.long)


def read_index_file(path: Path, train_size: int) -> Tensor:
    """Training indices, one per line ('#' comments allowed); an unknown index is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"label file {path} {what_is_at(path)}; name a text file of training indices")
    return _indices(path, _entries(path), train_size)


def read_subset_file(path: Path, dataset: ImageDataset) -> Tensor:
    """Sorted training indices of the labeled subset a file lists, one image a line.

    A file of numbers lists training indices (as ``read_index_file``); otherwise each line is an
    image's file name (SimCLR's ImageNet subsets: ``n01440764_10026.JPEG``), matched against the
    training split's ``names`` by base name, or by the whole relative name when it holds a '/'.
    The labels are the dataset's own. An unknown or ambiguous name is an error naming it and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"label subset file {path} {what_is_at(path)}; name a text file of training indices or image names"
        )
    entries = _entries(path)
    if not entries:
        raise ConfigError(f"label subset file {path} lists no images")
    numeric = [entry.lstrip("-").isdigit() for _, entry in entries]
    if all(numeric):
        return _indices(path, entries, len(dataset.train))
    if any(numeric):
        number, entry = entries[numeric.index(True)]
        raise ConfigError(
            f"{path}:{number}: {shown(entry)} is an index, but other lines are file names; use one kind per file"
        )
    names = getattr(dataset.train, "names", None)
    if names is None:
        raise ConfigError(
            f"{path} lists file names, but dataset {dataset.name} has no file names: list training indices instead"
        )
    by_name: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        by_name.setdefault(name, []).append(index)
        base = PurePosixPath(name).name
        if base != name:
            by_name.setdefault(base, []).append(index)
    chosen = []
    for number, entry in entries:
        matches = by_name.get(entry, [])
        if not matches:
            raise ConfigError(f"{path}:{number}: no training image of dataset {dataset.name} is named {shown(entry)}")
        if len(matches) > 1:
            raise ConfigError(
                f"{path}:{number}: {shown(entry)} names {len(matches)} training images ({names[matches[0]]}, "
                f"{names[matches[1]]}, ...); write the class folder too, e.g. {names[matches[0]]}"
            )
        chosen.append(matches[0])
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"{path}: an image is listed twice")
    return torch.tensor(sorted(chosen), dtype=torch.long)
