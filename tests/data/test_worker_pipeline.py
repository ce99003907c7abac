"""The two augmentation paths: the worker path (torchvision per image in loader processes) and the
device path (BatchAugment, checked here on CPU tensors) against torchvision's semantics."""

from __future__ import annotations

import math
from itertools import permutations

import pytest
import torch
from torchvision.transforms import RandomResizedCrop as RandomResizedCropV1
from torchvision.transforms.v2 import functional as TF

from suncet.data import InMemoryImages
from suncet.data.augment import (
    BatchAugment,
    JitterParameters,
    apply_jitter,
    crop_resize_flip,
    eval_transform,
    gaussian_blur,
    sample_crop_boxes,
    sample_jitter,
)
from suncet.data.pipeline import DevicePipeline, StepPlan
from suncet.data.recipe import AugmentRecipe, CropSpec
from suncet.data.worker_pipeline import (
    LABELED_STREAM,
    UNLABELED_STREAM,
    WorkerPipeline,
    _StepViews,
    image_seed,
    image_transform,
    normalize_views,
)
from suncet.errors import ConfigError

CPU = torch.device("cpu")


def recipe(**changes) -> AugmentRecipe:
    base = dict(
        global_crop=CropSpec(16, (0.08, 1.0)),
        local_crop=CropSpec(8, (0.05, 0.14)),
        color_strength=1.0,
        blur_p=0.5,
        mean=(0.5, 0.4, 0.3),
        std=(0.25, 0.25, 0.25),
    )
    base.update(changes)
    return AugmentRecipe(**base)


def source(n: int = 48, size: int = 20, seed: int = 0) -> InMemoryImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return InMemoryImages(images, torch.arange(n) % 4)


def plans(steps: int = 3, batch: int = 8, labeled: int = 4) -> list[StepPlan]:
    return [
        StepPlan(torch.arange(s * batch, (s + 1) * batch), torch.arange(labeled) + s, (torch.arange(labeled) + s) % 4)
        for s in range(steps)
    ]


def run(
    num_workers: int,
    seed: int = 0,
    local_views: int = 2,
    steps: list[StepPlan] | None = None,
    epoch: int = 0,
    first_step: int = 0,
) -> list:
    data = source()
    pipeline = WorkerPipeline(data, data, recipe(), 2, local_views, CPU, seed, num_workers=num_workers)
    return list(pipeline.batches(steps if steps is not None else plans(), epoch, first_step))


def tensors(batch) -> list[torch.Tensor]:
    return [*batch.global_views, *batch.local_views, batch.labeled]


# ---------------------------------------------------------------------------------------------
# Worker path.


def test_worker_batches_have_the_views_a_method_expects():
    batches = run(num_workers=0)
    assert [b.step for b in batches] == [0, 1, 2] and all(b.epoch == 0 for b in batches)
    first = batches[0]
    assert len(first.global_views) == 2 and len(first.local_views) == 2
    assert first.global_views[0].shape == (8, 3, 16, 16) and first.local_views[0].shape == (8, 3, 8, 8)
    assert first.labeled.shape == (4, 3, 16, 16) and first.labels.tolist() == [0, 1, 2, 3]
    for view in tensors(first):
        assert view.dtype == torch.float32 and torch.isfinite(view).all()
        # Normalised [0, 1] pixels: (x - mean) / std with mean <= 0.5, std 0.25.
        assert view.min() >= -2.0 - 1e-5 and view.max() <= (1 - 0.3) / 0.25 + 1e-5
    assert not torch.equal(first.global_views[0], first.global_views[1])


def test_worker_views_do_not_depend_on_the_number_of_workers():
    alone, pooled = run(num_workers=0), run(num_workers=2)
    for a, b in zip(alone, pooled, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(tensors(a), tensors(b), strict=True))


def test_worker_views_follow_the_seed_and_survive_a_resume():
    full = run(num_workers=0, seed=1, epoch=3, first_step=30)
    assert not torch.equal(
        full[0].global_views[0], run(num_workers=0, seed=2, epoch=3, first_step=30)[0].global_views[0]
    )
    resumed = run(num_workers=0, seed=1, steps=plans()[1:], epoch=3, first_step=31)
    for a, b in zip(full[1:], resumed, strict=True):
        assert a.step == b.step and all(torch.equal(x, y) for x, y in zip(tensors(a), tensors(b)))
    other_epoch = run(num_workers=0, seed=1, epoch=4, first_step=30)
    assert not torch.equal(full[0].global_views[0], other_epoch[0].global_views[0])


def test_worker_path_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(num_workers=0)
    assert torch.equal(torch.rand(3), expected)


def test_worker_without_local_views_or_labels():
    data = source()
    pipeline = WorkerPipeline(data, data, recipe(), 2, 0, CPU, 0, num_workers=0)
    (batch,) = pipeline.batches([StepPlan(torch.arange(4), None, None)], 0, 0)
    assert batch.local_views == [] and batch.labeled is None and batch.labels is None
    assert pipeline.state_dict() == {}


def test_worker_path_refuses_gpu_decoding_and_negative_workers():
    data = source()
    data.decode_device = "cuda"
    with pytest.raises(ConfigError, match="decode_device=cuda"):
        WorkerPipeline(data, data, recipe(), 2, 0, CPU, 0, num_workers=1)
    with pytest.raises(ConfigError, match="num_workers must be at least 0"):
        WorkerPipeline(source(), source(), recipe(), 2, 0, CPU, 0, num_workers=-1)


def full_pipeline_views(data, r, seed, epoch, step, indices, crop, stream, view):
    """Independent reference: torchvision's whole v2 pipeline, image by image, seeded as documented."""
    transform = image_transform(r, crop)
    views = []
    for position, index in enumerate(indices):
        torch.manual_seed(image_seed(seed, epoch, step, stream, position, view))
        views.append(transform(data.images[index]))
    return torch.stack(views)


def test_worker_views_are_torchvisions_full_per_image_pipeline():
    data, r, seed, epoch, step = source(), recipe(), 3, 2, 5
    (plan,) = plans(steps=1)
    (batch,) = WorkerPipeline(data, data, r, 2, 2, CPU, seed, num_workers=1).batches([plan], epoch, step)
    for view in range(2):
        expected = full_pipeline_views(
            data, r, seed, epoch, step, plan.unlabeled, r.global_crop, UNLABELED_STREAM, view
        )
        assert torch.equal(batch.global_views[view], expected)
        expected = full_pipeline_views(
            data, r, seed, epoch, step, plan.unlabeled, r.local_crop, UNLABELED_STREAM, 2 + view
        )
        assert torch.equal(batch.local_views[view], expected)
    expected = full_pipeline_views(data, r, seed, epoch, step, plan.labeled, r.global_crop, LABELED_STREAM, 0)
    assert torch.equal(batch.labeled, expected)


def test_uint8_views_normalised_on_arrival_equal_the_full_pipeline():
    # What a CUDA run does: workers stop at uint8, the batch is normalised once on the GPU.
    data, r, seed, epoch, step = source(), recipe(), 3, 2, 5
    (plan,) = plans(steps=1)
    views = _StepViews(data, data, r, 2, 0, seed, normalize=False)[(epoch, step, plan.unlabeled.numpy(), None)]
    for view, uint8_views in enumerate(views["global"]):
        assert uint8_views.dtype == torch.uint8
        expected = full_pipeline_views(
            data, r, seed, epoch, step, plan.unlabeled, r.global_crop, UNLABELED_STREAM, view
        )
        assert torch.equal(normalize_views(uint8_views, r), expected)


def test_image_seed_mixes_every_part():
    seeds = {image_seed(0, e, s, 0, p, v) for e in range(3) for s in range(3) for p in range(3) for v in range(3)}
    assert len(seeds) == 81 and all(0 <= x < 2**63 for x in seeds)


# ---------------------------------------------------------------------------------------------
# Device path against torchvision, component by component.


@pytest.mark.parametrize("size", [7, 16, 96])  # 96 > the CPU's per-crop threshold: the other code path
def test_crop_resize_flip_equals_torchvision_resized_crop(size):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 40, 52, generator=g)
    boxes = sample_crop_boxes(12, 40, 52, (0.05, 1.0), (3 / 4, 4 / 3), g, CPU)
    flip = torch.arange(12) % 2 == 0
    views = crop_resize_flip(images, boxes, flip, size)
    for i, (top, left, h, w) in enumerate(boxes.long().tolist()):
        expected = TF.resized_crop(images[i], top, left, h, w, [size, size], antialias=True)
        torch.testing.assert_close(views[i], expected.flip(-1) if flip[i] else expected, atol=2e-6, rtol=0)


def test_crop_boxes_match_torchvision_distribution():
    n, height, width, scale, ratio = 4000, 40, 56, (0.08, 1.0), (3 / 4, 4 / 3)
    ours = sample_crop_boxes(n, height, width, scale, ratio, torch.Generator().manual_seed(0), CPU)
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = torch.tensor([RandomResizedCropV1.get_params(image, list(scale), list(ratio)) for _ in range(n)]).float()
    for statistic in (
        lambda b: b[:, 2] * b[:, 3] / (height * width),  # area fraction
        lambda b: torch.log(b[:, 3] / b[:, 2]),  # log aspect ratio
        lambda b: b[:, 0] / height,  # top
        lambda b: b[:, 1] / width,  # left
    ):
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        assert (torch.quantile(statistic(ours), q) - torch.quantile(statistic(theirs), q)).abs().max() < 0.04


def test_jitter_equals_torchvision_functional_in_the_sampled_order():
    g = torch.Generator().manual_seed(1)
    n = 24
    x = torch.rand(n, 3, 9, 11, generator=g)
    params = sample_jitter(n, 1.0, g, CPU)
    apply = torch.rand(n, generator=g) < 0.8
    ours = apply_jitter(x, params, apply)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(n):
        expected = x[i]
        if apply[i]:
            for step in params.order[i].tolist():
                if step == 3:
                    expected = TF.adjust_hue(expected, params.hue[i].item())
                else:
                    expected = adjust[step](expected, params.factors[i, step].item())
        torch.testing.assert_close(ours[i], expected, atol=1e-5, rtol=0)


def test_jitter_parameters_follow_color_jitter_distributions():
    n, strength = 24000, 0.5
    params = sample_jitter(n, strength, torch.Generator().manual_seed(2), CPU)
    low, high = 1 - 0.8 * strength, 1 + 0.8 * strength
    blends = params.factors[:, :3]
    assert blends.min() >= low and blends.max() <= high and (params.factors[:, 3] == 1).all()
    assert (blends.mean(0) - 1).abs().max() < 0.01 and (blends.std(0) - (high - low) / math.sqrt(12)).abs().max() < 0.01
    assert params.hue.abs().max() <= 0.2 * strength and params.hue.mean().abs() < 0.003
    counts = {}
    for order in params.order.tolist():
        counts[tuple(order)] = counts.get(tuple(order), 0) + 1
    assert set(counts) == set(permutations(range(4)))  # ColorJitter's randperm(4)
    assert max(abs(c - n / 24) for c in counts.values()) < 5 * math.sqrt(n / 24)


def test_jitter_leaves_grayscale_images_hue_and_saturation_alone():
    x = torch.rand(6, 1, 5, 5)
    params = JitterParameters(
        torch.tensor([[1.0, 1.0, 0.2, 1.0]] * 6), torch.full((6,), 0.3), torch.tensor([[2, 3, 0, 1]] * 6)
    )
    torch.testing.assert_close(apply_jitter(x, params, torch.ones(6, dtype=torch.bool)), x)


def test_blur_equals_torchvision_gaussian_blur():
    x = torch.rand(4, 3, 20, 20)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    ours = gaussian_blur(x, sigma, 5)
    for i in range(4):
        torch.testing.assert_close(ours[i], TF.gaussian_blur(x[i], [5, 5], [sigma[i].item()] * 2), atol=1e-5, rtol=0)


def test_eval_view_is_the_central_crop_of_larger_images():
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    r = recipe(global_crop=CropSpec(224, (0.08, 1.0)), mean=(0.0,) * 3, std=(1.0,) * 3)
    torch.testing.assert_close(eval_transform(images, r), images[:, :, 16:240, 16:240].float() / 255)
    small = recipe(global_crop=CropSpec(16, (0.08, 1.0)), mean=(0.0,) * 3, std=(1.0,) * 3)
    assert eval_transform(images[:, :, :16, :16], small).shape == (2, 3, 16, 16)


# ---------------------------------------------------------------------------------------------
# Both paths produce views with the same statistics.


def view_statistics(views: torch.Tensor, r: AugmentRecipe) -> dict[str, float]:
    pixels = views * torch.tensor(r.std).view(1, 3, 1, 1) + torch.tensor(r.mean).view(1, 3, 1, 1)
    channel_spread = (pixels.max(dim=1).values - pixels.min(dim=1).values).flatten(1)
    gray = (channel_spread < 1e-4).all(dim=1)
    return {
        "brightness": pixels.mean().item(),
        "spread": pixels.std(dim=(1, 2, 3)).mean().item(),
        "gray": gray.float().mean().item(),
    }


def test_device_and_worker_paths_agree_in_distribution():
    r = recipe(blur_p=0.5, global_crop=CropSpec(16, (0.2, 1.0)))
    # Smooth images, so that crops and jitter change statistics the way they do on photographs.
    g = torch.Generator().manual_seed(5)
    coarse = torch.rand(400, 3, 4, 4, generator=g)
    images = (torch.nn.functional.interpolate(coarse, size=(24, 24), mode="bilinear") * 255).round().to(torch.uint8)
    device_views = BatchAugment(r, r.global_crop)(images, torch.Generator().manual_seed(0))
    data = InMemoryImages(images, torch.zeros(len(images), dtype=torch.long))
    pipeline = WorkerPipeline(data, data, r, 1, 0, CPU, seed=0, num_workers=0)
    (batch,) = pipeline.batches([StepPlan(torch.arange(len(images)), None, None)], 0, 0)
    worker_views = batch.global_views[0]
    ours, theirs = view_statistics(device_views, r), view_statistics(worker_views, r)
    assert abs(ours["brightness"] - theirs["brightness"]) < 0.02
    assert abs(ours["spread"] - theirs["spread"]) < 0.02
    assert abs(ours["gray"] - theirs["gray"]) < 0.05 and abs(ours["gray"] - 0.2) < 0.05


def test_device_pipeline_runs_on_cpu_tensors():
    data = source()
    pipeline = DevicePipeline(data, data, recipe(), 2, 2, CPU, seed=0)
    (batch,) = pipeline.batches(plans(steps=1), 0, 0)
    assert batch.global_views[0].shape == (8, 3, 16, 16) and batch.local_views[1].shape == (8, 3, 8, 8)


def test_device_pipeline_refuses_a_generator_state_it_cannot_use():
    from suncet.errors import CheckpointError

    data = source()
    pipeline = DevicePipeline(data, data, recipe(), 2, 0, CPU, seed=0)
    cuda_generator_state = torch.zeros(16, dtype=torch.uint8)  # what CUDA runs wrote before 2026-11-28
    with pytest.raises(CheckpointError, match="generator state does not fit"):
        pipeline.load_state_dict({"generator": cuda_generator_state})
    other = DevicePipeline(data, data, recipe(), 2, 0, CPU, seed=5)
    other.load_state_dict(pipeline.state_dict())
    first, second = (next(p.batches(plans(steps=1), 0, 0)).global_views[0] for p in (pipeline, other))
    assert torch.equal(first, second)


def test_closing_the_worker_pipeline_stops_its_processes():
    import multiprocessing

    data = source()
    pipeline = WorkerPipeline(data, data, recipe(), 2, 0, CPU, seed=0, num_workers=2)
    list(pipeline.batches(plans(steps=2), 0, 0))
    assert len(multiprocessing.active_children()) >= 2  # persistent workers outlive the epoch
    pipeline.close()
    assert multiprocessing.active_children() == []
    assert len(list(pipeline.batches(plans(steps=1), 1, 2))) == 1  # and start again when needed
    pipeline.close()
