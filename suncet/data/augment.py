"""Batched SimCLR/SwAV augmentations on device tensors, with per-sample random parameters.

One call transforms a whole uint8 batch [B, C, H, W], or an ``ImageBatch`` of images of
different sizes (each crop box drawn in its own image), where it lies (GPU or CPU) and draws
every random parameter from the generator it is given, with the distributions of
torchvision's RandomResizedCrop, RandomHorizontalFlip, ColorJitter (random order of the four
adjustments per sample), RandomGrayscale, GaussianBlur and RandomSolarize. Crop, resize and
flip are one separable resampling with torchvision's antialiased bilinear weights, so a view
equals torchvision's ``resized_crop`` of the same box (docs/data.md).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from suncet.data.image_batch import ImageBatch
from suncet.data.recipe import VIEW_COLUMNS, AugmentRecipe, CropSpec, ViewColumn, blur_kernel_size
from suncet.data.transfer import to_device


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def sample_crop_boxes(
    n: int,
    height: int | Tensor,
    width: int | Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    device: torch.device,
    attempts: int = 10,
) -> Tensor:
    """Integer crop boxes [n, 4] (top, left, h, w) drawn as torchvision's RandomResizedCrop.

    ``height`` and ``width`` are the image size, or each sample's own ([n] tensors, for images
    of different sizes). Each sample takes its first of ``attempts`` draws that fits, else the
    central crop with the aspect ratio clamped to ``ratio``.
    """
    height = torch.as_tensor(height, device=device).expand(n).float()
    width = torch.as_tensor(width, device=device).expand(n).float()
    area = (height * width)[:, None]
    target_area = area * _uniform(n * attempts, scale[0], scale[1], generator, device).view(n, attempts)
    log_ratio = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), generator, device).view(n, attempts)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = torch.argmax(fits.int(), dim=1)
    any_fit = fits.any(dim=1)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)

    # The fallback in float64, as torchvision computes it with Python floats.
    in_ratio = width.double() / height.double()
    too_tall, too_wide = in_ratio < ratio[0], in_ratio > ratio[1]
    fallback_w = torch.where(too_wide, torch.round(height.double() * ratio[1]).float(), width)
    fallback_h = torch.where(too_tall, torch.round(width.double() / ratio[0]).float(), height)
    w = torch.where(any_fit, w, fallback_w)
    h = torch.where(any_fit, h, fallback_h)
    # randint(0, H - h + 1) per sample, from one uniform draw.
    u = torch.rand(2, n, generator=generator, device=device)
    top = torch.minimum(torch.floor(u[0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[1] * (width - w + 1)), width - w)
    top = torch.where(any_fit, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(any_fit, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1)


def resize_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Per-sample [n, out_size, in_size] matrices resizing the window [start, start + length) to
    ``out_size`` pixels as torchvision's antialiased bilinear resize of the cropped window does.

    The triangle filter widens with the downscale factor (antialiasing) and only pixels inside
    the window carry weight: the crop never blends in its neighbours, unlike grid sampling.
    """
    dtype = torch.float32
    start, length = start.to(dtype)[:, None, None], length.to(dtype)[:, None, None]
    scale = length / out_size
    centers = start + (torch.arange(out_size, device=start.device, dtype=dtype)[None, :, None] + 0.5) * scale
    pixels = torch.arange(in_size, device=start.device, dtype=dtype)[None, None, :] + 0.5
    weights = (1 - (pixels - centers).abs() / scale.clamp(min=1)).clamp(min=0)
    weights = weights * ((pixels > start) & (pixels < start + length))
    return weights / weights.sum(dim=2, keepdim=True)


# Above this output side a CPU resizes crop by crop (torch's antialiased interpolate applies the
# same weights): the dense batched product costs side * H * W per channel and loses there.
CPU_PER_CROP_ABOVE = 64


def crop_resize_flip(images: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Each box (top, left, h, w) resized to size x size, mirrored where ``flip``; float in, float out."""
    _, _, height, width = images.shape
    if images.device.type == "cpu" and size > CPU_PER_CROP_ABOVE:
        views = []
        for image, (top, left, h, w), mirror in zip(images, boxes.long().tolist(), flip.tolist()):
            window = image[None, :, top : top + h, left : left + w]
            view = F.interpolate(window, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            views.append(view.flip(-1) if mirror else view)
        return torch.cat(views)
    top, left, h, w = boxes.unbind(1)
    rows = resize_weights(top, h, height, size)
    cols = resize_weights(left, w, width, size)
    cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)
    return rows[:, None] @ images.to(rows.dtype) @ cols.transpose(1, 2)[:, None]


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Luma with torchvision's weights; a one-channel image is its own grayscale."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (fraction of a turn) per sample, as torchvision's adjust_hue.

    Hue (in sixths of a turn), saturation and value come from the channels' max and min; the
    way back uses the closed form channel = max - (max - min) * clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 * hue) mod 6, n = 5, 3, 1 for red, green, blue.
    """
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    delta = maxc - minc
    safe_delta = torch.where(delta > 0, delta, 1.0)
    red_max, green_max = maxc == r, maxc == g
    numerator = torch.where(red_max, g - b, torch.where(green_max, b - r, r - g))
    sector = torch.where(red_max, 0.0, torch.where(green_max, 2.0, 4.0)) + 6.0 * shift.view(-1, 1, 1)
    hue6 = (numerator / safe_delta + sector).unsqueeze(1)
    k = torch.cat([hue6 + 5.0, hue6 + 3.0, hue6 + 1.0], dim=1).remainder(6.0)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0, 1)


@dataclass
class JitterParameters:
    """One sample's ColorJitter draw per row: blend factors, hue shift and order of the four steps."""

    factors: Tensor  # [n, 4]: brightness, contrast, saturation, 1 (the hue step blends nothing)
    hue: Tensor  # [n] shift, fraction of a turn
    order: Tensor  # [n, 4]: step index (0 brightness, 1 contrast, 2 saturation, 3 hue) of each slot


def sample_jitter(n: int, strength: float, generator: torch.Generator, device: torch.device) -> JitterParameters:
    """ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)'s distributions: uniform factors, a uniform random order."""
    low, high = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    blends = [_uniform(n, low, high, generator, device) for _ in range(3)]
    factors = torch.stack([*blends, torch.ones(n, device=device)], dim=1)
    hue = _uniform(n, -0.2 * strength, 0.2 * strength, generator, device)
    order = torch.argsort(torch.rand(n, 4, generator=generator, device=device), dim=1)
    return JitterParameters(factors, hue, order)


def apply_jitter(x: Tensor, params: JitterParameters, apply: Tensor) -> Tensor:
    """The jitter of ``params`` on the samples where ``apply``.

    Brightness, contrast and saturation are blends with black, the mean gray level and the
    grayscale image: each slot of the order blends every sample with its own factor and
    target (factor 1 where the slot holds another step). The costly hue rotation runs once
    per sample: samples are grouped by the slot that holds their hue step, which costs one
    host synchronisation per call for the group sizes.
    """
    colour = x.shape[1] == 3
    order = params.order
    # Group by the slot of the hue step (4: no hue), so that each group is a contiguous slice.
    hue_slot = torch.where(apply & colour, torch.argmax((order == 3).int(), dim=1), torch.full_like(order[:, 0], 4))
    perm = torch.argsort(hue_slot, stable=True)
    bounds = [0, *torch.bincount(hue_slot, minlength=5).cumsum(0).tolist()]
    x, factors, hue, order, apply = x[perm], params.factors[perm], params.hue[perm], order[perm], apply[perm]
    for slot in range(4):
        step = torch.where(apply, order[:, slot], torch.full_like(order[:, slot], 3))
        factor = factors.gather(1, step[:, None]).view(-1, 1, 1, 1)
        gray = rgb_to_grayscale(x)
        is_contrast = (step == 1).to(x.dtype).view(-1, 1, 1, 1)
        is_saturation = (step == 2).to(x.dtype).view(-1, 1, 1, 1)
        # Black for brightness, the mean gray level for contrast, the grayscale image for saturation.
        target = torch.addcmul(gray.mean(dim=(1, 2, 3), keepdim=True) * is_contrast, gray, is_saturation)
        # lerp computes x - (x - target) * (1 - factor) for factors >= 0.5: factor 1 leaves x exact.
        x = torch.lerp(target, x, factor).clamp_(0, 1)
        first, last = bounds[slot], bounds[slot + 1]
        if last > first:
            x[first:last] = _adjust_hue(x[first:last], hue[first:last])
    out = torch.empty_like(x)
    out[perm] = x
    return out


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


def triton_augment_usable(device: torch.device) -> bool:
    """Whether BatchAugment runs as the Triton kernels on ``device`` (CUDA, with triton)."""
    if device.type != "cuda":
        return False
    try:
        import suncet.data.augment_triton  # noqa: F401
    except Exception:  # a triton that cannot build the kernels leaves the PyTorch path
        return False
    return True


class BatchAugment:
    """Random views of a uint8 batch: crop, flip, colour, grayscale, blur, solarize, normalise.

    Every random parameter is drawn from ``generator`` where it lives (the CPU, for the device
    pipeline) into one table (``ViewColumn``) that reaches the images' device in one copy.
    ``triton_kernels`` (default: on CUDA when triton imports) runs the steps as the Triton
    kernels of suncet/data/augment_triton.py instead of PyTorch operations: the same parameters and
    formulas, four to six kernels, no host synchronisation.
    """

    def __init__(self, recipe: AugmentRecipe, crop: CropSpec, triton_kernels: bool | None = None):
        self.recipe = recipe
        self.crop = crop
        self.triton_kernels = triton_kernels
        self._normalisers: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _steps(self, channels: int) -> dict[str, bool]:
        r = self.recipe
        return {
            "jitter": r.color_strength > 0 and r.color_p > 0,
            "gray": r.grayscale_p > 0 and channels == 3,
            "blur": r.blur_p > 0,
            "solarize": r.solarize_p > 0,
        }

    def sample(
        self, n: int, height: int | Tensor, width: int | Tensor, channels: int, generator: torch.Generator
    ) -> Tensor:
        """The [n, VIEW_COLUMNS] parameter table of n views of H x W images (or of images of
        sizes ``height[i]`` x ``width[i]``), on the generator's device."""
        r, steps, device = self.recipe, self._steps(channels), generator.device
        table = torch.zeros(n, VIEW_COLUMNS, device=device)

        def draw_flag(column: ViewColumn, p: float) -> None:
            table[:, column] = torch.rand(n, generator=generator, device=device) < p

        table[:, ViewColumn.TOP : ViewColumn.WIDTH + 1] = sample_crop_boxes(
            n, height, width, self.crop.scale, r.ratio, generator, device
        )
        draw_flag(ViewColumn.FLIP, r.flip_p)
        if steps["jitter"]:
            draw_flag(ViewColumn.APPLY_JITTER, r.color_p)
            jitter = sample_jitter(n, r.color_strength, generator, device)
            table[:, ViewColumn.FACTORS : ViewColumn.FACTORS + 4] = jitter.factors
            table[:, ViewColumn.HUE] = jitter.hue
            table[:, ViewColumn.ORDER : ViewColumn.ORDER + 4] = jitter.order
        if steps["gray"]:
            draw_flag(ViewColumn.GRAY, r.grayscale_p)
        if steps["blur"]:
            draw_flag(ViewColumn.BLUR, r.blur_p)
            table[:, ViewColumn.SIGMA] = _uniform(n, r.blur_sigma[0], r.blur_sigma[1], generator, device)
        if steps["solarize"]:
            draw_flag(ViewColumn.SOLARIZE, r.solarize_p)
        return table

    def __call__(self, images: Tensor | ImageBatch, generator: torch.Generator) -> Tensor:
        if isinstance(images, ImageBatch):
            # Each box lies in its own image: the batch's padding is never read.
            height, width = images.sizes.unbind(1)
            images = images.pixels
        else:
            height, width = images.shape[-2:]
        n, channels = images.shape[:2]
        params = self.sample(n, height, width, channels, generator)
        params = to_device(params, images.device)
        use_triton = self.triton_kernels if self.triton_kernels is not None else triton_augment_usable(images.device)
        return self._triton_views(images, params) if use_triton else self._torch_views(images, params)

    def _torch_views(self, images: Tensor, params: Tensor) -> Tensor:
        steps = self._steps(images.shape[1])
        flag = lambda column: params[:, column] > 0.5  # noqa: E731
        boxes = params[:, ViewColumn.TOP : ViewColumn.WIDTH + 1]
        x = crop_resize_flip(images.float() / 255.0, boxes, flag(ViewColumn.FLIP), self.crop.size).clamp(0, 1)
        if steps["jitter"]:
            jitter = JitterParameters(
                params[:, ViewColumn.FACTORS : ViewColumn.FACTORS + 4],
                params[:, ViewColumn.HUE],
                params[:, ViewColumn.ORDER : ViewColumn.ORDER + 4].long(),
            )
            x = apply_jitter(x, jitter, flag(ViewColumn.APPLY_JITTER))
        if steps["gray"]:
            x = torch.where(flag(ViewColumn.GRAY).view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
        if steps["blur"]:
            blurred = gaussian_blur(x, params[:, ViewColumn.SIGMA], blur_kernel_size(self.crop.size))
            x = torch.where(flag(ViewColumn.BLUR).view(-1, 1, 1, 1), blurred, x)
        if steps["solarize"]:
            x = torch.where(flag(ViewColumn.SOLARIZE).view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
        if x.device not in self._normalisers:
            # Made once per device: a tensor built from Python numbers on a GPU synchronises.
            self._normalisers[x.device] = tuple(
                torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(x.device)
                for values in (self.recipe.mean, self.recipe.std)
            )
        mean, std = self._normalisers[x.device]
        return (x - mean) / std

    def _triton_views(self, images: Tensor, params: Tensor) -> Tensor:
        from suncet.data.augment_triton import blur_steps, color_steps, crop_views

        r, steps = self.recipe, self._steps(images.shape[1])
        last = not steps["blur"]  # the colour kernel finishes the view unless a blur follows it
        # Triton launches on the current device: make it the images' one.
        with torch.cuda.device(images.device) if images.is_cuda else contextlib.nullcontext():
            x = crop_views(images, params, self.crop.size)
            x = color_steps(
                x,
                params,
                steps["jitter"],
                steps["gray"],
                steps["solarize"] and last,
                r.mean if last else None,
                r.std if last else None,
            )
            if last:
                return x
            return blur_steps(x, params, blur_kernel_size(self.crop.size), steps["solarize"], r.mean, r.std)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


# Evaluation sees the central 87.5% of an image stored larger than the crop (ImageNet's
# resize-256, center-crop-224 protocol).
EVAL_CROP_FRACTION = 0.875


def eval_transform(images: Tensor | ImageBatch, recipe: AugmentRecipe) -> Tensor:
    """Deterministic view for evaluation, normalised. Images of any size (``ImageBatch``): the
    short side resized to crop / 0.875, then the central crop, as torchvision's Resize(256) and
    CenterCrop(224). A square batch: images stored at or below the global crop size are
    resized to it; larger ones are resized to crop / 0.875 and center-cropped."""
    size = recipe.global_crop.size
    resized = round(size / EVAL_CROP_FRACTION)
    if isinstance(images, ImageBatch):
        views = [TF.resize(image.float() / 255.0, [resized], antialias=True) for image in images]
        return normalize(torch.stack([TF.center_crop(view, [size, size]) for view in views]), recipe.mean, recipe.std)
    x = images.float() / 255.0
    if min(x.shape[-2:]) > size:
        if x.shape[-2:] != (resized, resized):
            x = F.interpolate(x, size=(resized, resized), mode="bilinear", align_corners=False, antialias=True)
        top = (resized - size) // 2
        x = x[..., top : top + size, top : top + size]
    elif x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, recipe.mean, recipe.std)
