"""Batched SimCLR/SwAV augmentations on device tensors, with per-sample random parameters.

One call transforms a whole uint8 batch [B, C, H, W] where it lies (GPU or CPU) and draws
every random parameter from the generator it is given, with the distributions of
torchvision's RandomResizedCrop, RandomHorizontalFlip, ColorJitter (random order of the four
adjustments per sample), RandomGrayscale, GaussianBlur and RandomSolarize. Crop and flip are
one bilinear resampling through an affine grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    device: torch.device,
    attempts: int = 10,
) -> Tensor:
    """Integer crop boxes [n, 4] (top, left, h, w) drawn as torchvision's RandomResizedCrop.

    Each sample takes its first of ``attempts`` draws that fits, else the central crop with
    the aspect ratio clamped to ``ratio``.
    """
    area = height * width
    target_area = area * _uniform(n * attempts, scale[0], scale[1], generator, device).view(n, attempts)
    log_ratio = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), generator, device).view(n, attempts)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.int(), dim=1)
    any_fit = fits.any(dim=1)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(any_fit, w, torch.full_like(w, fallback_w))
    h = torch.where(any_fit, h, torch.full_like(h, fallback_h))
    # randint(0, H - h + 1) per sample, from one uniform draw.
    u = torch.rand(2, n, generator=generator, device=device)
    top = torch.floor(u[0] * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(u[1] * (width - w + 1)).clamp(max=width - w)
    top = torch.where(any_fit, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(any_fit, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1)


def crop_resize_flip(images: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Bilinear crop of each box to size x size, mirrored where ``flip``; float in, float out."""
    n, _, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    sign = 1.0 - 2.0 * flip.to(images.dtype)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = w / width * sign
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def rgb_to_grayscale(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp(0, 1)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (fraction of a turn) through HSV, per sample."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    safe_max = torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    sat = torch.where(maxc > 0, delta / safe_max, torch.zeros_like(maxc))
    rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    p = maxc * (1 - sat)
    q = maxc * (1 - sat * f)
    t = maxc * (1 - sat * (1 - f))
    i = i.long() % 6
    v = maxc
    choices_r = torch.stack([v, q, p, p, t, v], dim=1)
    choices_g = torch.stack([t, v, v, q, p, p], dim=1)
    choices_b = torch.stack([p, p, t, v, v, q], dim=1)
    index = i.unsqueeze(1)
    return torch.cat(
        [choices_r.gather(1, index), choices_g.gather(1, index), choices_b.gather(1, index)], dim=1
    )


def color_jitter(x: Tensor, strength: float, apply: Tensor, generator: torch.Generator) -> Tensor:
    """ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) on the samples where ``apply``, each in its own random order."""
    n, device = x.shape[0], x.device
    brightness = _uniform(n, max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength, generator, device)
    contrast = _uniform(n, max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength, generator, device)
    saturation = _uniform(n, max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength, generator, device)
    hue = _uniform(n, -0.2 * strength, 0.2 * strength, generator, device)
    order = torch.argsort(torch.rand(n, 4, generator=generator, device=device), dim=1)
    colour = x.shape[1] == 3
    for slot in range(4):
        op = torch.where(apply, order[:, slot], torch.full_like(order[:, slot], -1))
        for which in range(4):
            idx = torch.nonzero(op == which).squeeze(1)
            if idx.numel() == 0:
                continue
            part = x[idx]
            if which == 0:
                part = (part * brightness[idx].view(-1, 1, 1, 1)).clamp(0, 1)
            elif which == 1:
                mean = rgb_to_grayscale(part).mean(dim=(1, 2, 3), keepdim=True)
                part = _blend(part, mean, contrast[idx])
            elif which == 2 and colour:
                part = _blend(part, rgb_to_grayscale(part), saturation[idx])
            elif which == 3 and colour:
                part = _adjust_hue(part, hue[idx])
            x = x.index_copy(0, idx, part)
    return x


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma (reflect padding, as torchvision)."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # [n*c, k]
    flat = x.reshape(1, n * c, h, w)
    flat = F.pad(flat, (half, half, 0, 0), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    flat = F.pad(flat, (0, 0, half, half), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return flat.view(n, c, h, w)


def blur_kernel_size(size: int) -> int:
    """SimCLR's kernel: 10% of the crop side, odd, at least 3."""
    k = max(3, int(round(0.1 * size)))
    return k if k % 2 else k + 1


class BatchAugment:
    """Random views of a uint8 batch: crop, flip, colour, grayscale, blur, solarize, normalise."""

    def __init__(self, recipe: AugmentRecipe, crop: CropSpec):
        self.recipe = recipe
        self.crop = crop

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        r = self.recipe
        n, _, height, width = images.shape
        device = images.device
        x = images.float() / 255.0
        boxes = sample_crop_boxes(n, height, width, self.crop.scale, r.ratio, generator, device)
        flip = torch.rand(n, generator=generator, device=device) < r.flip_p
        x = crop_resize_flip(x, boxes, flip, self.crop.size).clamp(0, 1)
        if r.color_strength > 0 and r.color_p > 0:
            apply = torch.rand(n, generator=generator, device=device) < r.color_p
            x = color_jitter(x, r.color_strength, apply, generator)
        if r.grayscale_p > 0 and x.shape[1] == 3:
            gray = torch.rand(n, generator=generator, device=device) < r.grayscale_p
            x = torch.where(gray.view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
        if r.blur_p > 0:
            blur = torch.rand(n, generator=generator, device=device) < r.blur_p
            sigma = _uniform(n, r.blur_sigma[0], r.blur_sigma[1], generator, device)
            blurred = gaussian_blur(x, sigma, blur_kernel_size(self.crop.size))
            x = torch.where(blur.view(-1, 1, 1, 1), blurred, x)
        if r.solarize_p > 0:
            solarize = torch.rand(n, generator=generator, device=device) < r.solarize_p
            x = torch.where(solarize.view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
        return normalize(x, r.mean, r.std)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def eval_transform(images: Tensor, recipe: AugmentRecipe) -> Tensor:
    """Deterministic view for evaluation: resize to the global crop size, normalise."""
    x = images.float() / 255.0
    size = recipe.global_crop.size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, recipe.mean, recipe.std)
