"""BatchAugment's Triton kernels (suncet/data/augment_triton.py) against its PyTorch path.

Both paths draw the same parameters from the same seed, so their views must agree pixel for
pixel; the PyTorch path itself is checked against torchvision in test_worker_pipeline.py. On a
machine without a GPU the kernels run in the Triton interpreter (in a subprocess that sets
TRITON_INTERPRET=1 when this process does not); the GPU tests run on the device machine.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rerun_under_triton_interpreter, skip_unless_triton_interpreter

from suncet.data.augment import BatchAugment
from suncet.data.recipe import AugmentRecipe, CropSpec


def recipe(**changes) -> AugmentRecipe:
    base = dict(
        global_crop=CropSpec(16, (0.08, 1.0)),
        local_crop=CropSpec(8, (0.05, 0.14)),
        color_strength=1.0,
        blur_p=0.5,
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.25, 0.3),
    )
    base.update(changes)
    return AugmentRecipe(**base)


RECIPES = {
    "imagenet-like (jitter, grayscale, blur)": recipe(),
    "blur, solarize, several pixel chunks": recipe(global_crop=CropSpec(40, (0.3, 1.0)), blur_p=0.7, solarize_p=0.5),
    "no blur: solarize and normalise in the kernel": recipe(blur_p=0.0, solarize_p=0.5),
    "several pixel chunks per sample": recipe(global_crop=CropSpec(40, (0.3, 1.0)), blur_p=0.0, solarize_p=0.2),
    "weak jitter, always applied": recipe(color_strength=0.5, color_p=1.0, blur_p=0.0),
    "no jitter": recipe(color_strength=0.0, blur_p=0.0),
    "one channel": recipe(blur_p=0.0, grayscale_p=0.0, mean=(0.5,), std=(0.25,)),
}


def both_paths(r: AugmentRecipe, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    views = [
        BatchAugment(r, r.global_crop, triton_kernels=fused)(images, torch.Generator().manual_seed(seed))
        for fused in (False, True)
    ]
    return views[0], views[1]


@pytest.fixture
def interpreter():
    skip_unless_triton_interpreter()


@pytest.mark.parametrize("name", list(RECIPES))
def test_interpreted_colour_kernels_equal_the_pytorch_path(interpreter, name):
    r = RECIPES[name]
    channels = len(r.mean)
    images = torch.randint(
        0, 256, (24, channels, 44, 44), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    reference, fused = both_paths(r, images, seed=7)
    assert fused.shape == reference.shape and fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, atol=2e-5, rtol=0)
    if r.color_strength > 0:  # the jitter did something, so the comparison means something
        unjittered = BatchAugment(recipe(**{**r.__dict__, "color_strength": 0.0}), r.global_crop, triton_kernels=False)
        plain = unjittered(images, torch.Generator().manual_seed(7))
        assert (plain - reference).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.5


def test_interpreted_wide_blur_equals_gaussian_blur(interpreter):
    from suncet.data.augment import gaussian_blur
    from suncet.data.augment_triton import blur_steps
    from suncet.data.recipe import VIEW_COLUMNS, ViewColumn

    gen = torch.Generator().manual_seed(5)
    x = torch.rand(4, 3, 26, 31, generator=gen)
    params = torch.zeros(4, VIEW_COLUMNS)
    params[:, ViewColumn.SIGMA] = sigma = torch.tensor([0.1, 0.9, 1.6, 2.0])
    params[:, ViewColumn.BLUR] = blur = torch.tensor([1.0, 1.0, 0.0, 1.0])
    ours = blur_steps(x, params, 23, False, None, None)  # ImageNet's 224 px views use 23 taps
    expected = torch.where(blur.bool().view(-1, 1, 1, 1), gaussian_blur(x, sigma, 23), x)
    torch.testing.assert_close(ours, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("stored,size", [(44, 16), (20, 36), (37, 37)])
def test_interpreted_crop_equals_crop_resize_flip(interpreter, stored, size):
    from suncet.data.augment import crop_resize_flip, sample_crop_boxes
    from suncet.data.augment_triton import crop_views
    from suncet.data.recipe import VIEW_COLUMNS, ViewColumn

    gen = torch.Generator().manual_seed(stored + size)
    images = torch.randint(0, 256, (10, 3, stored, stored + 3), dtype=torch.uint8, generator=gen)
    params = torch.zeros(10, VIEW_COLUMNS)
    boxes = sample_crop_boxes(10, stored, stored + 3, (0.05, 1.0), (3 / 4, 4 / 3), gen, torch.device("cpu"))
    params[:, ViewColumn.TOP : ViewColumn.WIDTH + 1] = boxes
    params[:, ViewColumn.FLIP] = flip = (torch.arange(10) % 2).float()
    expected = crop_resize_flip(images.float() / 255, boxes, flip.bool(), size)
    torch.testing.assert_close(crop_views(images, params, size), expected, atol=2e-6, rtol=0)


def test_interpreted_views_of_images_of_different_sizes(interpreter):
    """An ImageBatch (image files of several sizes, zero-padded): the kernels read each image's
    own boxes only, as the PyTorch path does, through the whole recipe."""
    from suncet.data.image_batch import ImageBatch

    gen = torch.Generator().manual_seed(3)
    shapes = [(30, 52), (47, 21), (18, 18), (40, 33)]
    batch = ImageBatch.stack([torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in shapes])
    r = RECIPES["imagenet-like (jitter, grayscale, blur)"]
    fused, torch_ops = (BatchAugment(r, r.global_crop, triton_kernels=flag) for flag in (True, False))
    torch.testing.assert_close(
        fused(batch, torch.Generator().manual_seed(0)),
        torch_ops(batch, torch.Generator().manual_seed(0)),
        atol=2e-5,
        rtol=0,
    )


def test_batches_over_int32_offsets_are_refused_with_a_clear_error():
    pytest.importorskip("triton")
    from suncet.data.augment_triton import _check_size

    _check_size("crop_views", 4096, 3, 256, 256)  # 805M elements: fine
    with pytest.raises(ValueError, match="over 2\\^31; split the batch"):
        _check_size("crop_views", 16384, 3, 256, 256)


def test_interpreter_in_subprocess():
    rerun_under_triton_interpreter(__file__, "interpreted", passed=len(RECIPES) + 5)


# ---------------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_check.sh).

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@needs_cuda
@pytest.mark.parametrize("name", list(RECIPES))
def test_colour_kernels_equal_the_pytorch_path_on_cuda(name):
    r = RECIPES[name]
    gen = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (64, len(r.mean), 72, 72), dtype=torch.uint8, generator=gen).cuda()
    reference, fused = both_paths(r, images, seed=11)
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=0)


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "name", ["imagenet-like (jitter, grayscale, blur)", "no blur: solarize and normalise in the kernel"]
)
def test_device_pipeline_on_cuda_never_synchronises_the_host(name):
    from suncet.data import InMemoryImages
    from suncet.data.pipeline import DevicePipeline, StepPlan

    r = RECIPES[name]
    images = torch.randint(0, 256, (256, 3, 128, 128), dtype=torch.uint8)
    data = InMemoryImages(images, torch.arange(256) % 10).to(torch.device("cuda"))
    pipeline = DevicePipeline(data, data, r, 2, 1, torch.device("cuda"), seed=0)
    plans = [StepPlan(torch.randperm(256)[:64], torch.arange(16), torch.arange(16) % 10) for _ in range(3)]
    list(pipeline.batches(plans[:1], 0, 0))  # the first step makes the normalisation constants
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(pipeline.batches(plans[1:], 0, 1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for batch in batches:
        assert all(torch.isfinite(view).all() for view in batch.global_views + batch.local_views + [batch.labeled])
