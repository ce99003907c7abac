"""BatchAugment's steps as Triton kernels, for CUDA batches.

The PyTorch path (suncet/data/augment.py) spends some seventy full passes over a batch, and more
than a hundred small launches for the per-sample parameters, on what is memory traffic and
launch overhead on a GPU, not arithmetic. Here every sample's parameters arrive as one row of
a float table drawn on the host (``VIEW_COLUMNS`` columns, suncet/data/augment.py) and copied in one
transfer, and the steps run as:

- the crop: two separable passes of torchvision's antialiased bilinear weights over the box,
  computed on the fly from the uint8 image (the first pass reads bytes, the second mirrors);
- the colour: one kernel sums the grayscale level that each sample's contrast step blends
  towards (which depends on the steps before it in the sample's own order), a second
  recomputes the steps, applies them all, grayscale and, without blur, solarize and normalise;
- the blur: one kernel per axis (per-sample sigma, reflect padding, others copied), the second
  solarizing and normalising.

Four to six kernels per view, no host synchronisation, the same parameters and formulas as the
PyTorch path (tests/data/test_augment_triton.py compares both).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from suncet.data.recipe import VIEW_COLUMNS, ViewColumn

# `# fmt: skip` keeps the kernels' signatures and launches as tables: runtime arguments, then
# compile-time constants, a group a line.

_PIXELS = 1024  # output elements per program
_MAX_ELEMENTS = 2**31  # offsets are int32


def _check_size(name: str, *sizes: int) -> None:
    if math.prod(sizes) >= _MAX_ELEMENTS:
        raise ValueError(f"{name}: a batch of {' x '.join(map(str, sizes))} elements is over 2^31; split the batch")


_COLUMNS = tl.constexpr(VIEW_COLUMNS)
_TOP = tl.constexpr(int(ViewColumn.TOP))
_LEFT = tl.constexpr(int(ViewColumn.LEFT))
_HEIGHT = tl.constexpr(int(ViewColumn.HEIGHT))
_WIDTH = tl.constexpr(int(ViewColumn.WIDTH))
_FLIP = tl.constexpr(int(ViewColumn.FLIP))
_APPLY_JITTER = tl.constexpr(int(ViewColumn.APPLY_JITTER))
_FACTORS = tl.constexpr(int(ViewColumn.FACTORS))
_HUE = tl.constexpr(int(ViewColumn.HUE))
_ORDER = tl.constexpr(int(ViewColumn.ORDER))
_GRAY = tl.constexpr(int(ViewColumn.GRAY))
_BLUR = tl.constexpr(int(ViewColumn.BLUR))
_SIGMA = tl.constexpr(int(ViewColumn.SIGMA))
_SOLARIZE = tl.constexpr(int(ViewColumn.SOLARIZE))


@triton.jit
def _flag(row_ptr, column):
    return tl.load(row_ptr + column) > 0.5


# ---------------------------------------------------------------------------------------------
# Crop, resize and flip.


@triton.jit
def _resample(src_ptr, start, length, in_size, out_size, along, stride, ok, TAPS: tl.constexpr):
    """sum_p w(out, p) src[p] / sum_p w(out, p) with the triangle weights of resizing the
    window [start, start + length) to out_size samples; ``along`` (int) is where the output
    lies on that axis, ``stride`` the step between source samples."""
    scale = length / out_size
    support = tl.maximum(scale, 1.0)
    center = start + (along + 0.5) * scale
    first = tl.floor(center - 0.5 - support).to(tl.int32) + 1
    total = tl.zeros_like(center)
    weights = tl.zeros_like(center)
    for t in tl.static_range(TAPS):
        p = first + t
        inside = (p >= start) & (p < start + length) & (p < in_size) & ok
        w = tl.where(inside, tl.maximum(1.0 - tl.abs(p + 0.5 - center) / support, 0.0), 0.0)
        total += w * tl.load(src_ptr + p * stride, mask=inside, other=0).to(tl.float32)
        weights += w
    return total / tl.where(weights > 0, weights, 1.0)


@triton.jit
def _crop_rows_kernel(images_ptr, params_ptr, rows_ptr, C, H, W, S, TAPS: tl.constexpr, BLOCK: tl.constexpr):
    """rows[n, c, i, x] for the box's columns x: the box's rows resampled to S, from uint8."""
    plane = tl.program_id(0)
    sample = plane // C
    row = params_ptr + sample * _COLUMNS
    top = tl.load(row + _TOP)
    height = tl.load(row + _HEIGHT)
    left = tl.load(row + _LEFT).to(tl.int32)
    width = tl.load(row + _WIDTH).to(tl.int32)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    i = idx // W
    x = idx % W
    ok = (i < S) & (x >= left) & (x < left + width)
    value = _resample(images_ptr + plane * H * W + x, top, height, H, S, i, W, ok, TAPS)
    tl.store(rows_ptr + plane * S * W + idx, value, mask=ok)


@triton.jit
def _crop_columns_kernel(rows_ptr, params_ptr, out_ptr, C, W, S, TAPS: tl.constexpr, BLOCK: tl.constexpr):
    """out[n, c, i, j]: the rows' box columns resampled to S (mirrored where drawn), in [0, 1]."""
    plane = tl.program_id(0)
    sample = plane // C
    row = params_ptr + sample * _COLUMNS
    left = tl.load(row + _LEFT)
    width = tl.load(row + _WIDTH)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    i = idx // S
    j = idx % S
    ok = i < S
    j = tl.where(_flag(row, _FLIP), S - 1 - j, j)
    value = _resample(rows_ptr + plane * S * W + i * W, left, width, W, S, j, 1, ok, TAPS)
    tl.store(out_ptr + plane * S * S + idx, value * (1.0 / 255.0), mask=ok)


def _taps(in_size: int, out_size: int) -> int:
    """Enough taps for any window of an ``in_size`` axis resized to ``out_size``."""
    return math.ceil(2 * max(1.0, in_size / out_size)) + 1


def crop_views(images: Tensor, params: Tensor, size: int) -> Tensor:
    """The box of each ``params`` row (top, left, height, width, flip) of uint8 ``images``
    [n, C, H, W], resized to ``size`` x ``size`` as torchvision's antialiased resized_crop,
    mirrored where flipped: float32 in [0, 1]."""
    n, channels, height, width = images.shape
    if images.dtype != torch.uint8:
        raise ValueError(f"crop_views takes uint8 images, got {images.dtype}")
    _check_size("crop_views", n, channels, max(height, size), max(width, size))
    images = images.contiguous()
    rows = torch.empty((n, channels, size, width), device=images.device, dtype=torch.float32)
    _crop_rows_kernel[(n * channels, triton.cdiv(size * width, _PIXELS))](
        images, params, rows, channels, height, width, size, TAPS=_taps(height, size), BLOCK=_PIXELS
    )
    out = torch.empty((n, channels, size, size), device=images.device, dtype=torch.float32)
    _crop_columns_kernel[(n * channels, triton.cdiv(size * size, _PIXELS))](
        rows, params, out, channels, width, size, TAPS=_taps(width, size), BLOCK=_PIXELS
    )
    return out


# ---------------------------------------------------------------------------------------------
# Colour.


@triton.jit
def _clamp01(v):
    return tl.minimum(tl.maximum(v, 0.0), 1.0)


@triton.jit
def _lerp(target, x, weight):
    # torch.lerp's two formulas, so that a factor of 1 leaves x exact.
    return tl.where(weight < 0.5, target + weight * (x - target), x - (x - target) * (1.0 - weight))


@triton.jit
def _gray(r, g, b, C: tl.constexpr):
    if C == 3:
        return 0.2989 * r + 0.587 * g + 0.114 * b
    else:
        return r


@triton.jit
def _hue_channel(maxc, delta, hue6, n):
    k = hue6 + n
    k = k - 6.0 * tl.floor(k / 6.0)
    return maxc - delta * _clamp01(tl.minimum(k, 4.0 - k))


@triton.jit
def _rotate_hue(r, g, b, shift):
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    delta = maxc - minc
    safe_delta = tl.where(delta > 0, delta, 1.0)
    red_max = maxc == r
    green_max = maxc == g
    numerator = tl.where(red_max, g - b, tl.where(green_max, b - r, r - g))
    sector = tl.where(red_max, 0.0, tl.where(green_max, 2.0, 4.0)) + 6.0 * shift
    hue6 = numerator / safe_delta + sector
    return (
        _hue_channel(maxc, delta, hue6, 5.0),
        _hue_channel(maxc, delta, hue6, 3.0),
        _hue_channel(maxc, delta, hue6, 1.0),
    )


@triton.jit
def _adjust(r, g, b, step, factor, shift, mean, C: tl.constexpr):
    """One ColorJitter step (0 brightness, 1 contrast, 2 saturation, 3 hue) on a pixel block."""
    if step == 3:
        if C == 3:
            r, g, b = _rotate_hue(r, g, b, shift)
    else:
        if step == 0:
            target = tl.zeros_like(r)
        elif step == 1:
            target = tl.zeros_like(r) + mean
        else:
            target = _gray(r, g, b, C)
        if (C == 3) | (step != 2):  # saturation leaves a one-channel image alone
            r = _clamp01(_lerp(target, r, factor))
            if C == 3:
                g = _clamp01(_lerp(target, g, factor))
                b = _clamp01(_lerp(target, b, factor))
    return r, g, b


@triton.jit
def _load_pixels(x_ptr, sample, pixels, ok, HW, C: tl.constexpr):
    base = x_ptr + sample * C * HW + pixels
    r = _clamp01(tl.load(base, mask=ok, other=0.0))
    g = r
    b = r
    if C == 3:
        g = _clamp01(tl.load(base + HW, mask=ok, other=0.0))
        b = _clamp01(tl.load(base + 2 * HW, mask=ok, other=0.0))
    return r, g, b


@triton.jit
def _step_of_slot(row, slot):
    return tl.load(row + _ORDER + slot).to(tl.int32)


@triton.jit
def _contrast_sums_kernel(x_ptr, params_ptr, partial_ptr, HW, chunks, C: tl.constexpr, BLOCK: tl.constexpr):
    """Per (sample, pixel chunk): the sum of the grayscale level entering the contrast step."""
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    row = params_ptr + sample * _COLUMNS
    pixels = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = pixels < HW
    if _flag(row, _APPLY_JITTER):
        r, g, b = _load_pixels(x_ptr, sample, pixels, ok, HW, C)
        contrast_slot = 0
        for slot in tl.static_range(4):
            contrast_slot = tl.where(_step_of_slot(row, slot) == 1, slot, contrast_slot)
        shift = tl.load(row + _HUE)
        for slot in tl.static_range(4):
            if slot < contrast_slot:
                step = _step_of_slot(row, slot)
                r, g, b = _adjust(r, g, b, step, tl.load(row + _FACTORS + step), shift, 0.0, C)
        tl.store(partial_ptr + sample * chunks + chunk, tl.sum(tl.where(ok, _gray(r, g, b, C), 0.0), 0))


@triton.jit
def _color_kernel(
    x_ptr, params_ptr, partial_ptr, out_ptr, HW, chunks, m0, m1, m2, s0, s1, s2,
    C: tl.constexpr, JITTER: tl.constexpr, GRAY: tl.constexpr, SOLARIZE: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
):  # fmt: skip
    sample = tl.program_id(0)
    row = params_ptr + sample * _COLUMNS
    pixels = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = pixels < HW
    r, g, b = _load_pixels(x_ptr, sample, pixels, ok, HW, C)
    if JITTER:
        if _flag(row, _APPLY_JITTER):
            parts = tl.arange(0, CHUNKS)
            mean = tl.sum(tl.load(partial_ptr + sample * chunks + parts, mask=parts < chunks, other=0.0), 0) / HW
            shift = tl.load(row + _HUE)
            for slot in tl.static_range(4):
                step = _step_of_slot(row, slot)
                r, g, b = _adjust(r, g, b, step, tl.load(row + _FACTORS + step), shift, mean, C)
    if GRAY:
        if _flag(row, _GRAY):
            r = _gray(r, g, b, C)
            g = r
            b = r
    if SOLARIZE:
        if _flag(row, _SOLARIZE):
            r = tl.where(r >= 0.5, 1.0 - r, r)
            g = tl.where(g >= 0.5, 1.0 - g, g)
            b = tl.where(b >= 0.5, 1.0 - b, b)
    if NORMALIZE:
        r = (r - m0) / s0
        g = (g - m1) / s1
        b = (b - m2) / s2
    base = out_ptr + sample * C * HW + pixels
    tl.store(base, r, mask=ok)
    if C == 3:
        tl.store(base + HW, g, mask=ok)
        tl.store(base + 2 * HW, b, mask=ok)


def _channel_constants(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> tuple[float, ...]:
    m = (*mean, 0.0, 0.0)[:3] if mean is not None else (0.0,) * 3
    s = (*std, 1.0, 1.0)[:3] if std is not None else (1.0,) * 3
    return (*m, *s)


def color_steps(
    x: Tensor,
    params: Tensor,
    jitter: bool,
    gray: bool,
    solarize: bool,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> Tensor:
    """Clamp to [0, 1]; with the flags, ColorJitter, grayscale and solarize where each sample's
    ``params`` row draws them; then ``(x - mean) / std`` unless ``mean`` is None. ``x``:
    float32 [n, C, H, W] with C in (1, 3)."""
    n, channels, height, width = x.shape
    if x.dtype != torch.float32 or channels not in (1, 3):
        raise ValueError(f"color_steps takes float32 [n, 1 or 3, H, W] batches, got {x.dtype} {tuple(x.shape)}")
    _check_size("color_steps", n, channels, height, width)
    x = x.contiguous()
    hw = height * width
    chunks = triton.cdiv(hw, _PIXELS)
    partial = torch.empty((n, chunks), device=x.device, dtype=torch.float32) if jitter else x
    if jitter:
        _contrast_sums_kernel[(n, chunks)](x, params, partial, hw, chunks, C=channels, BLOCK=_PIXELS)
    out = torch.empty_like(x)
    _color_kernel[(n, chunks)](
        x, params, partial, out, hw, chunks, *_channel_constants(mean, std),
        C=channels, JITTER=jitter, GRAY=gray and channels == 3, SOLARIZE=solarize, NORMALIZE=mean is not None,
        BLOCK=_PIXELS, CHUNKS=triton.next_power_of_2(chunks),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Blur.


@triton.jit
def _reflect(i, size):
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= size, 2 * (size - 1) - i, i)


@triton.jit
def _blur_kernel(
    x_ptr, params_ptr, out_ptr, H, W, m0, m1, m2, s0, s1, s2,
    C: tl.constexpr, TAPS: tl.constexpr, ALONG_H: tl.constexpr, SOLARIZE: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One axis of the separable Gaussian blur of one (sample, channel) plane, where the sample
    is drawn for blur; with the flags, then solarize and normalise."""
    plane = tl.program_id(0)
    sample = plane // C
    row = params_ptr + sample * _COLUMNS
    pixels = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = pixels < H * W
    y = pixels // W
    x = pixels % W
    base = x_ptr + plane * H * W
    if _flag(row, _BLUR):
        sigma = tl.load(row + _SIGMA)
        half = TAPS // 2
        total = 0.0
        for t in tl.static_range(TAPS):
            total += tl.exp(-0.5 * ((t - half) / sigma) * ((t - half) / sigma))
        value = tl.zeros([BLOCK], tl.float32)
        for t in tl.static_range(TAPS):
            weight = tl.exp(-0.5 * ((t - half) / sigma) * ((t - half) / sigma)) / total
            if ALONG_H:
                source = _reflect(y + (t - half), H) * W + x
            else:
                source = y * W + _reflect(x + (t - half), W)
            value += weight * tl.load(base + source, mask=ok, other=0.0)
    else:
        value = tl.load(base + pixels, mask=ok, other=0.0)
    if SOLARIZE:
        if _flag(row, _SOLARIZE):
            value = tl.where(value >= 0.5, 1.0 - value, value)
    if NORMALIZE:
        channel = plane % C
        mean = tl.where(channel == 0, m0, tl.where(channel == 1, m1, m2))
        std = tl.where(channel == 0, s0, tl.where(channel == 1, s1, s2))
        value = (value - mean) / std
    tl.store(out_ptr + plane * H * W + pixels, value, mask=ok)


def blur_steps(
    x: Tensor,
    params: Tensor,
    kernel_size: int,
    solarize: bool,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> Tensor:
    """Gaussian blur (``kernel_size`` taps, each sample's sigma, reflect padding) where the
    ``params`` row draws it; then solarize where drawn (with ``solarize``) and ``(x - mean) /
    std`` unless ``mean`` is None. ``x``: float32 [n, C, H, W], sides above half the kernel."""
    n, channels, height, width = x.shape
    if kernel_size % 2 == 0 or kernel_size // 2 >= min(height, width):
        raise ValueError(f"blur kernel of {kernel_size} taps does not fit {height} x {width} views")
    _check_size("blur_steps", n, channels, height, width)
    x = x.contiguous()
    grid = (n * channels, triton.cdiv(height * width, _PIXELS))
    common = dict(C=channels, TAPS=kernel_size, BLOCK=_PIXELS)
    rows_blurred = torch.empty_like(x)
    _blur_kernel[grid](
        x, params, rows_blurred, height, width, *_channel_constants(None, None),
        ALONG_H=False, SOLARIZE=False, NORMALIZE=False, **common,
    )  # fmt: skip
    out = torch.empty_like(x)
    _blur_kernel[grid](
        rows_blurred, params, out, height, width, *_channel_constants(mean, std),
        ALONG_H=True, SOLARIZE=solarize, NORMALIZE=mean is not None, **common,
    )  # fmt: skip
    return out
