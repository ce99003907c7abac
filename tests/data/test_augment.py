"""Batched augmentations: geometry, parameter distributions, ranges and determinism."""

from __future__ import annotations

import math

import pytest
import torch

from suncet.data.augment import BatchAugment, crop_resize_flip, gaussian_blur, sample_crop_boxes
from suncet.data.recipe import AugmentRecipe, CropSpec


def recipe(**changes) -> AugmentRecipe:
    base = dict(
        global_crop=CropSpec(16, (0.08, 1.0)),
        local_crop=CropSpec(8, (0.05, 0.14)),
        color_strength=1.0,
        blur_p=0.5,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    base.update(changes)
    return AugmentRecipe(**base)


def images(n=64, size=16, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_crop_boxes_follow_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(20000, 64, 48, (0.2, 0.6), (3 / 4, 4 / 3), g, torch.device("cpu"))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
    area = h * w / (64 * 48)
    assert area.min() > 0.17 and area.max() < 0.64  # rounding widens the range slightly
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.42
    assert abs(torch.log(ratio).mean().item()) < 0.01  # log-uniform ratio is symmetric
    assert 0.35 < area.mean().item() < 0.45


def test_crop_boxes_match_torchvision_where_draws_often_do_not_fit():
    """Wide scale and ratio ranges on a non-square image: a third of the draws do not fit, so
    the retries decide the distribution; it must be torchvision's (first fitting draw)."""
    from torchvision.transforms import RandomResizedCrop

    n, height, width, scale, ratio = 20000, 64, 48, (0.3, 1.0), (1 / 3, 3.0)
    ours = sample_crop_boxes(n, height, width, scale, ratio, torch.Generator().manual_seed(0), torch.device("cpu"))
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    theirs = torch.tensor(
        [RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)], dtype=torch.float32
    )
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for column in range(4):  # top, left, h, w
        a, b = ours[:, column], theirs[:, column]
        assert abs(a.mean() - b.mean()) < 0.02 * max(height, width), column
        assert (torch.quantile(a, quantiles) - torch.quantile(b, quantiles)).abs().max() <= 2, column


def test_crop_boxes_fall_back_to_the_central_crop_when_nothing_fits():
    boxes = sample_crop_boxes(
        100, 64, 64, (0.9, 1.0), (3.0, 4.0), torch.Generator().manual_seed(0), torch.device("cpu")
    )
    # The aspect ratio is clamped to the range (width / 3), the crop centred, as in torchvision.
    assert boxes.tolist() == [[21.0, 0.0, 21.0, 64.0]] * 100


def test_identity_crop_and_flip_are_exact():
    square = torch.rand(3, 2, 6, 6)
    box = torch.tensor([[0.0, 0.0, 6.0, 6.0]]).repeat(3, 1)
    torch.testing.assert_close(crop_resize_flip(square, box, torch.zeros(3, dtype=torch.bool), 6), square)
    torch.testing.assert_close(crop_resize_flip(square, box, torch.ones(3, dtype=torch.bool), 6), square.flip(-1))


def test_crop_takes_the_right_window():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    box = torch.tensor([[2.0, 4.0, 4.0, 4.0]])  # rows 2..5, columns 4..7
    torch.testing.assert_close(crop_resize_flip(x, box, torch.zeros(1, dtype=torch.bool), 4), x[:, :, 2:6, 4:8])


def test_views_are_normalised_floats_of_the_crop_size():
    view = BatchAugment(recipe(mean=(0.5,) * 3, std=(0.25,) * 3), CropSpec(12, (0.3, 1.0)))(
        images(), torch.Generator().manual_seed(1)
    )
    assert view.shape == (64, 3, 12, 12) and view.dtype == torch.float32
    assert view.min() >= -2.0 - 1e-5 and view.max() <= 2.0 + 1e-5


def test_same_seed_same_views_other_seed_other_views():
    aug = BatchAugment(recipe(), CropSpec(16, (0.08, 1.0)))
    a = aug(images(), torch.Generator().manual_seed(3))
    b = aug(images(), torch.Generator().manual_seed(3))
    c = aug(images(), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_each_sample_gets_its_own_parameters():
    one = images(1).repeat(32, 1, 1, 1)
    views = BatchAugment(recipe(), CropSpec(16, (0.08, 1.0)))(one, torch.Generator().manual_seed(0))
    distinct = {tuple(v.flatten()[:20].tolist()) for v in views}
    assert len(distinct) == 32


def test_grayscale_probability():
    no_colour_change = recipe(color_strength=0.0, blur_p=0.0, grayscale_p=0.2)
    views = BatchAugment(no_colour_change, CropSpec(16, (1.0, 1.0)))(images(4000), torch.Generator().manual_seed(0))
    gray = (views[:, 0] == views[:, 1]).all(dim=(1, 2)) & (views[:, 1] == views[:, 2]).all(dim=(1, 2))
    assert abs(gray.float().mean().item() - 0.2) < 0.03


def test_blur_preserves_mean_and_smooths():
    x = torch.rand(4, 3, 32, 32)
    blurred = gaussian_blur(x, torch.full((4,), 2.0), 9)
    assert blurred.shape == x.shape
    assert abs(blurred.mean().item() - x.mean().item()) < 0.01
    assert blurred.std().item() < 0.5 * x.std().item()
    torch.testing.assert_close(gaussian_blur(x, torch.full((4,), 1e-3), 3), x)


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_keeps_range_and_shape(channels):
    r = recipe(mean=(0.0,) * channels, std=(1.0,) * channels, blur_p=0.0)
    x = torch.randint(0, 256, (256, channels, 8, 8), dtype=torch.uint8)
    views = BatchAugment(r, CropSpec(8, (1.0, 1.0)))(x, torch.Generator().manual_seed(2))
    assert views.shape == x.shape and views.min() >= 0 and views.max() <= 1
    assert not math.isnan(views.sum().item())
