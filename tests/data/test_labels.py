"""Label specs, class-stratified subset selection, and label files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from suncet.data.labels import labels_text, parse_label_spec, read_index_file, select_labeled
from suncet.errors import ConfigError

# An unbalanced 10-class training set: class c has 90 + 7c images.
LABELS = torch.cat([torch.full((90 + 7 * c,), c) for c in range(10)])[
    torch.randperm(1215, generator=torch.Generator().manual_seed(0))
]


@pytest.mark.parametrize(
    "text,fraction,per_class",
    [("10%", 0.1, None), ("0.5%", 0.005, None), ("0%", 0.0, None), ("100%", 1.0, None), ("4/class", None, 4)],
)
def test_parse_valid(text, fraction, per_class):
    spec = parse_label_spec(text)
    assert spec.fraction == fraction and spec.per_class == per_class


@pytest.mark.parametrize("text", ["150%", "-1%", "abc", "10", "0/class", "%", "1.2.3%", "4/klass"])
def test_parse_invalid(text):
    with pytest.raises(ConfigError, match="--labels"):
        parse_label_spec(text)


def test_fraction_is_stratified_and_seeded():
    chosen = select_labeled(LABELS, parse_label_spec("10%"), 10, seed=3)
    assert len(chosen) == round(0.1 * len(LABELS)) and len(set(chosen.tolist())) == len(chosen)
    counts = np.bincount(LABELS[chosen].numpy(), minlength=10)
    sizes = np.bincount(LABELS.numpy(), minlength=10)
    assert np.all(np.abs(counts - 0.1 * sizes) <= 1.0 + 1e-9), counts
    assert torch.equal(chosen, select_labeled(LABELS, parse_label_spec("10%"), 10, seed=3))
    assert not torch.equal(chosen, select_labeled(LABELS, parse_label_spec("10%"), 10, seed=4))


def test_small_fraction_keeps_one_per_class_when_it_can():
    chosen = select_labeled(LABELS, parse_label_spec("1%"), 10, seed=0)  # 12 images, 10 classes
    assert len(chosen) == 12
    assert set(LABELS[chosen].tolist()) == set(range(10))


def test_fraction_below_one_per_class_picks_distinct_classes():
    chosen = select_labeled(LABELS, parse_label_spec("0.5%"), 10, seed=0)  # 6 images
    assert len(chosen) == 6 and len(set(LABELS[chosen].tolist())) == 6


def test_zero_and_all():
    assert len(select_labeled(LABELS, parse_label_spec("0%"), 10, seed=0)) == 0
    assert torch.equal(select_labeled(LABELS, parse_label_spec("100%"), 10, seed=0), torch.arange(len(LABELS)))


def test_per_class_count():
    chosen = select_labeled(LABELS, parse_label_spec("4/class"), 10, seed=0)
    assert np.bincount(LABELS[chosen].numpy(), minlength=10).tolist() == [4] * 10


def test_more_per_class_than_exist_is_an_error():
    with pytest.raises(ConfigError, match="class 0 has only 90 training images"):
        select_labeled(LABELS, parse_label_spec("100/class"), 10, seed=0)


def test_label_file_round_trip(tmp_path):
    chosen = select_labeled(LABELS, parse_label_spec("10%"), 10, seed=1)
    (tmp_path / "labels.txt").write_text(labels_text(chosen, "10%"))
    assert torch.equal(read_index_file(tmp_path / "labels.txt", len(LABELS)), chosen)


@pytest.mark.parametrize(
    "content,message",
    [("3\nx\n", "expected a training index"), ("1\n5000\n", "outside the training set"), ("2\n2\n", "listed twice")],
)
def test_label_file_errors(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_index_file(path, len(LABELS))


def test_missing_label_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_index_file(tmp_path / "nope.txt", 10)
