"""BatchAugment's colour and blur steps as Triton kernels, for CUDA batches.

The PyTorch path (suncet/augment.py) spends some sixty full passes over a batch on ColorJitter
(four blend slots, the hue rotation, per-slot targets), grayscale, solarize and normalise, and
one host synchronisation per call to group samples by the slot of their hue step; on a GPU
that is memory traffic and launch overhead, not arithmetic. Here each sample's own order of
the four adjustments runs per pixel in registers: one kernel sums the grayscale level that
each sample's contrast step blends towards (which depends on the steps before it), a second
recomputes the steps, applies them all and writes the view once. The Gaussian blur (per-sample
sigma, reflect padding, samples without blur copied) is one kernel per axis, the second of
which solarizes and normalises. Three to five passes over the batch, no host synchronisation,
the same parameters and the same formulas as the PyTorch path (the tests compare both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_PIXELS = 1024  # pixels of one sample per program


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
    return _hue_channel(maxc, delta, hue6, 5.0), _hue_channel(maxc, delta, hue6, 3.0), _hue_channel(maxc, delta, hue6, 1.0)


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
def _contrast_sums_kernel(
    x_ptr, partial_ptr, factors_ptr, hue_ptr, order_ptr, apply_ptr, HW, chunks, C: tl.constexpr, BLOCK: tl.constexpr
):
    """Per (sample, pixel chunk): the sum of the grayscale level entering the contrast step."""
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    pixels = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = pixels < HW
    if tl.load(apply_ptr + sample):
        r, g, b = _load_pixels(x_ptr, sample, pixels, ok, HW, C)
        contrast_slot = 0
        for slot in tl.static_range(4):
            contrast_slot = tl.where(tl.load(order_ptr + sample * 4 + slot) == 1, slot, contrast_slot)
        shift = tl.load(hue_ptr + sample)
        for slot in tl.static_range(4):
            if slot < contrast_slot:
                step = tl.load(order_ptr + sample * 4 + slot)
                factor = tl.load(factors_ptr + sample * 4 + step)
                r, g, b = _adjust(r, g, b, step, factor, shift, 0.0, C)
        tl.store(partial_ptr + sample * chunks + chunk, tl.sum(tl.where(ok, _gray(r, g, b, C), 0.0), 0))


@triton.jit
def _color_kernel(
    x_ptr, out_ptr, partial_ptr, factors_ptr, hue_ptr, order_ptr, apply_ptr, gray_ptr, solarize_ptr,
    HW, chunks, m0, m1, m2, s0, s1, s2,
    C: tl.constexpr, JITTER: tl.constexpr, GRAY: tl.constexpr, SOLARIZE: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
):  # fmt: skip
    sample = tl.program_id(0)
    pixels = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = pixels < HW
    r, g, b = _load_pixels(x_ptr, sample, pixels, ok, HW, C)
    if JITTER:
        if tl.load(apply_ptr + sample):
            parts = tl.arange(0, CHUNKS)
            mean = tl.sum(tl.load(partial_ptr + sample * chunks + parts, mask=parts < chunks, other=0.0), 0) / HW
            shift = tl.load(hue_ptr + sample)
            for slot in tl.static_range(4):
                step = tl.load(order_ptr + sample * 4 + slot)
                factor = tl.load(factors_ptr + sample * 4 + step)
                r, g, b = _adjust(r, g, b, step, factor, shift, mean, C)
    if GRAY:
        if tl.load(gray_ptr + sample):
            r = _gray(r, g, b, C)
            g = r
            b = r
    if SOLARIZE:
        if tl.load(solarize_ptr + sample):
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


@triton.jit
def _reflect(i, size):
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= size, 2 * (size - 1) - i, i)


@triton.jit
def _blur_kernel(
    x_ptr, out_ptr, blur_ptr, sigma_ptr, solarize_ptr, H, W, m0, m1, m2, s0, s1, s2,
    C: tl.constexpr, TAPS: tl.constexpr, ALONG_H: tl.constexpr, SOLARIZE: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One axis of the separable Gaussian blur of one (sample, channel) plane, where the sample
    is drawn for blur; with the flags, then solarize and normalise."""
    plane = tl.program_id(0)
    sample = plane // C
    pixels = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = pixels < H * W
    y = pixels // W
    x = pixels % W
    base = x_ptr + plane * H * W
    if tl.load(blur_ptr + sample):
        sigma = tl.load(sigma_ptr + sample)
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
        if tl.load(solarize_ptr + sample):
            value = tl.where(value >= 0.5, 1.0 - value, value)
    if NORMALIZE:
        channel = plane % C
        mean = tl.where(channel == 0, m0, tl.where(channel == 1, m1, m2))
        std = tl.where(channel == 0, s0, tl.where(channel == 1, s1, s2))
        value = (value - mean) / std
    tl.store(out_ptr + plane * H * W + pixels, value, mask=ok)


def _channel_constants(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> tuple[float, ...]:
    m = (*mean, 0.0, 0.0)[:3] if mean is not None else (0.0,) * 3
    s = (*std, 1.0, 1.0)[:3] if std is not None else (1.0,) * 3
    return (*m, *s)


def blur_steps(
    x: Tensor,
    blur: Tensor,
    sigma: Tensor,
    kernel_size: int,
    solarize: Tensor | None,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> Tensor:
    """Gaussian blur (``kernel_size`` taps, per-sample ``sigma``, reflect padding) where
    ``blur``, then solarize where ``solarize`` and ``(x - mean) / std``. ``x``: float32
    [n, C, H, W], C in (1, 3), both sides larger than half the kernel."""
    n, channels, height, width = x.shape
    if kernel_size % 2 == 0 or kernel_size // 2 >= min(height, width):
        raise ValueError(f"blur kernel of {kernel_size} taps does not fit {height} x {width} views")
    x = x.contiguous()
    sigma = sigma.float().contiguous()
    grid = (n * channels, triton.cdiv(height * width, _PIXELS))
    rows_blurred = torch.empty_like(x)
    common = dict(C=channels, TAPS=kernel_size, BLOCK=_PIXELS)
    _blur_kernel[grid](
        x, rows_blurred, blur, sigma, x, height, width, *_channel_constants(None, None),
        ALONG_H=False, SOLARIZE=False, NORMALIZE=False, **common,
    )  # fmt: skip
    out = torch.empty_like(x)
    _blur_kernel[grid](
        rows_blurred, out, blur, sigma, solarize if solarize is not None else x, height, width,
        *_channel_constants(mean, std), ALONG_H=True, SOLARIZE=solarize is not None, NORMALIZE=mean is not None,
        **common,
    )  # fmt: skip
    return out


def color_steps(
    x: Tensor,
    factors: Tensor | None,
    hue: Tensor | None,
    order: Tensor | None,
    apply: Tensor | None,
    gray: Tensor | None,
    solarize: Tensor | None,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> Tensor:
    """Clamp to [0, 1], ColorJitter where ``apply`` (per-sample ``factors``, ``hue``, ``order``
    as JitterParameters holds them), grayscale where ``gray``, solarize where ``solarize``, then
    ``(x - mean) / std``; a step whose argument is None is left out. ``x``: float32
    [n, C, H, W] with C in (1, 3), on a CUDA device (or on the CPU under TRITON_INTERPRET=1)."""
    n, channels, height, width = x.shape
    if x.dtype != torch.float32 or channels not in (1, 3):
        raise ValueError(f"color_steps takes float32 [n, 1 or 3, H, W] batches, got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    hw = height * width
    chunks = triton.cdiv(hw, _PIXELS)
    jitter = factors is not None
    if jitter:
        factors, hue, order = factors.float().contiguous(), hue.float().contiguous(), order.contiguous()
        partial = torch.empty((n, chunks), device=x.device, dtype=torch.float32)
        _contrast_sums_kernel[(n, chunks)](x, partial, factors, hue, order, apply, hw, chunks, C=channels, BLOCK=_PIXELS)
    else:
        factors = hue = order = apply = partial = x  # never read
    out = torch.empty_like(x)
    _color_kernel[(n, chunks)](
        x, out, partial, factors, hue, order, apply,
        gray if gray is not None else x, solarize if solarize is not None else x,
        hw, chunks, *_channel_constants(mean, std),
        C=channels, JITTER=jitter, GRAY=gray is not None and channels == 3, SOLARIZE=solarize is not None,
        NORMALIZE=mean is not None, BLOCK=_PIXELS, CHUNKS=triton.next_power_of_2(chunks),
    )  # fmt: skip
    return out
