"""BatchAugment's Triton kernels (suncet/augment_triton.py) against its PyTorch path.

Both paths draw the same parameters from the same seed, so their views must agree pixel for
pixel; the PyTorch path itself is checked against torchvision in test_worker_pipeline.py. On a
machine without a GPU the kernels run in the Triton interpreter (in a subprocess that sets
TRITON_INTERPRET=1 when this process does not); the GPU tests run on the device machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from suncet.augment import AugmentRecipe, BatchAugment, CropSpec


def recipe(**changes) -> AugmentRecipe:
    base = dict(
        global_crop=CropSpec(16, (0.08, 1.0)), local_crop=CropSpec(8, (0.05, 0.14)), color_strength=1.0,
        blur_p=0.5, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3),
    )  # fmt: skip
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
        BatchAugment(r, r.global_crop, triton_kernels=fused)(images, torch.Generator(images.device).manual_seed(seed))
        for fused in (False, True)
    ]
    return views[0], views[1]


def _interpreting() -> bool:
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.min, InterpretedFunction)


@pytest.fixture
def interpreter():
    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernels are checked compiled, by the gpu tests")
    pytest.importorskip("triton")
    if not _interpreting():
        pytest.skip("triton runs compiled here (TRITON_INTERPRET unset): test_interpreter_in_subprocess runs these")


@pytest.mark.parametrize("name", list(RECIPES))
def test_interpreted_colour_kernels_equal_the_pytorch_path(interpreter, name):
    r = RECIPES[name]
    channels = len(r.mean)
    images = torch.randint(0, 256, (24, channels, 44, 44), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    reference, fused = both_paths(r, images, seed=7)
    assert fused.shape == reference.shape and fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, atol=2e-5, rtol=0)
    if r.color_strength > 0:  # the jitter did something, so the comparison means something
        unjittered = BatchAugment(recipe(**{**r.__dict__, "color_strength": 0.0}), r.global_crop, triton_kernels=False)
        plain = unjittered(images, torch.Generator().manual_seed(7))
        assert (plain - reference).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.5


def test_interpreted_wide_blur_equals_gaussian_blur(interpreter):
    from suncet.augment import gaussian_blur
    from suncet.augment_triton import blur_steps

    gen = torch.Generator().manual_seed(5)
    x = torch.rand(4, 3, 26, 31, generator=gen)
    sigma = torch.tensor([0.1, 0.9, 1.6, 2.0])
    blur = torch.tensor([True, True, False, True])
    ours = blur_steps(x, blur, sigma, 23, None, None, None)  # ImageNet's 224 px views use 23 taps
    expected = torch.where(blur.view(-1, 1, 1, 1), gaussian_blur(x, sigma, 23), x)
    torch.testing.assert_close(ours, expected, atol=2e-6, rtol=0)


def test_interpreter_in_subprocess():
    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernels are checked compiled, by the gpu tests")
    pytest.importorskip("triton")
    if _interpreting():
        pytest.skip("this process interprets triton: the interpreter tests ran here")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted"]
    # From tests/, so that `python -m` does not put the repository's unbuilt suncet/ first on the path.
    proc = subprocess.run(command, env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"{len(RECIPES) + 1} passed" in proc.stdout, proc.stdout[-2000:]


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
@pytest.mark.parametrize("name", ["imagenet-like (jitter, grayscale, blur)", "no blur: solarize and normalise in the kernel"])
def test_batch_augment_on_cuda_never_synchronises_the_host(name):
    r = RECIPES[name]
    augment = BatchAugment(r, CropSpec(96, (0.08, 1.0)))
    images = torch.randint(0, 256, (32, 3, 128, 128), dtype=torch.uint8, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    augment(images, generator)  # the first call makes the normalisation constants
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = augment(images, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(views).all()
