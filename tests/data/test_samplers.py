"""The labeled class-stratified sampler and the unlabeled epoch sampler."""

from __future__ import annotations

import pytest
import torch

from suncet.data.samplers import ClassStratifiedSampler, UnlabeledSampler
from suncet.errors import ConfigError

LABELS = torch.tensor([c for c in range(6) for _ in range(5)])  # 6 classes x 5 labeled images


def test_each_step_has_k_classes_of_n_images():
    sampler = ClassStratifiedSampler(LABELS, classes_per_step=3, images_per_class=2, seed=0)
    for _ in range(10):
        positions, classes = sampler.next_batch()
        assert positions.shape == (6,) and classes.shape == (6,)
        assert torch.equal(LABELS[positions], classes)
        assert len(set(classes.tolist())) == 3
        assert all((classes == c).sum() == 2 for c in set(classes.tolist()))


def test_a_round_covers_every_class_once():
    sampler = ClassStratifiedSampler(LABELS, classes_per_step=2, images_per_class=1, seed=5)
    seen = [c for _ in range(3) for c in sampler.next_batch()[1].tolist()]
    assert sorted(seen) == list(range(6))


def test_labeled_stream_cycles_through_every_image_before_repeating():
    sampler = ClassStratifiedSampler(LABELS, classes_per_step=6, images_per_class=5, seed=1)
    positions, _ = sampler.next_batch()
    assert sorted(positions.tolist()) == list(range(30))


def test_ranks_share_classes_and_draw_disjoint_images():
    labels = torch.tensor([c for c in range(4) for _ in range(8)])
    ranks = [ClassStratifiedSampler(labels, 2, 2, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        (p0, c0), (p1, c1) = (s.next_batch() for s in ranks)
        assert torch.equal(c0, c1)
        assert not set(p0.tolist()) & set(p1.tolist())


def test_state_dict_resumes_the_same_stream():
    reference = ClassStratifiedSampler(LABELS, 4, 3, seed=2)
    expected = [reference.next_batch() for _ in range(7)]
    first = ClassStratifiedSampler(LABELS, 4, 3, seed=2)
    got = [first.next_batch() for _ in range(3)]
    resumed = ClassStratifiedSampler(LABELS, 4, 3, seed=2)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_batch() for _ in range(4)]
    for (pe, ce), (pg, cg) in zip(expected, got):
        assert torch.equal(pe, pg) and torch.equal(ce, cg)


def test_too_many_classes_per_step_is_an_error():
    with pytest.raises(ConfigError, match="--classes-per-step 7"):
        ClassStratifiedSampler(LABELS, 7, 1, seed=0)


def test_unlabeled_epoch_is_a_permutation_split_over_ranks():
    full = UnlabeledSampler(50, 8, seed=3).epoch_batches(0)
    assert full.shape == (6, 8) and len(set(full.flatten().tolist())) == 48
    halves = [UnlabeledSampler(50, 4, seed=3, rank=r, world_size=2).epoch_batches(0) for r in range(2)]
    assert halves[0].shape == (6, 4)
    assert not set(halves[0].flatten().tolist()) & set(halves[1].flatten().tolist())
    assert torch.equal(UnlabeledSampler(50, 8, seed=3).epoch_batches(0), full)
    assert not torch.equal(UnlabeledSampler(50, 8, seed=3).epoch_batches(1), full)


def test_batch_larger_than_the_data_is_an_error():
    with pytest.raises(ConfigError, match="--batch-size 64"):
        UnlabeledSampler(50, 64, seed=0)
