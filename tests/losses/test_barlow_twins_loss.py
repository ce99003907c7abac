"""BarlowTwinsLoss against a float64 transcription of lightly's formula (lightly-ai/lightly,
lightly/loss/barlow_twins_loss.py at e8d317f: ``BarlowTwinsLoss.forward``, ``_normalize`` =
``F.batch_norm(z, None, None, training=True)``, i.e. ``(z - mean) / sqrt(biased var + 1e-5)``,
``_off_diagonal``), which is the authors' (facebookresearch/barlowtwins, main.py,
``BarlowTwins.forward`` with ``nn.BatchNorm1d(affine=False)``): values, gradients, terms, bad
settings, NaN. Also checked against torch's own F.batch_norm as lightly calls it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from suncet.losses import BarlowTwinsLoss


def data(rows=10, dim=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(rows, dim, generator=g, dtype=dtype) * torch.linspace(0.2, 3.0, dim, dtype=dtype)
    return z_a, z_a + 0.7 * torch.randn(rows, dim, generator=g, dtype=dtype)


def lightly_barlow_terms(z_a, z_b):
    """Plain loops in float64: each column standardised by its batch mean and biased variance
    (eps 1e-5 inside the square root, as F.batch_norm in training mode); c_ij = sum_n a_ni b_nj / N;
    on-diagonal sum_i (c_ii - 1)^2, off-diagonal sum_{i != j} c_ij^2."""
    n, d = z_a.shape

    def standardised(z):
        columns = []
        for j in range(d):
            mean = sum(z[i, j] for i in range(n)) / n
            var = sum((z[i, j] - mean) ** 2 for i in range(n)) / n
            columns.append([(z[i, j] - mean) / torch.sqrt(var + 1e-5) for i in range(n)])
        return columns

    a, b = standardised(z_a), standardised(z_b)
    on, off = 0.0, 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][k] * b[j][k] for k in range(n)) / n
            if i == j:
                on = on + (c - 1) ** 2
            else:
                off = off + c**2
    return on, off


def lightly_barlow(z_a, z_b, lambda_param=5e-3):
    on, off = lightly_barlow_terms(z_a, z_b)
    return on + lambda_param * off


@pytest.mark.parametrize("lambda_param", [5e-3, 0.0051, 0.5, 0.0])
def test_value_and_gradients_equal_lightlys_formula(lambda_param):
    z_a, z_b = data()
    a, b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    want = lightly_barlow(a, b, lambda_param)
    want_grads = torch.autograd.grad(want, (a, b))
    x, y = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    got = BarlowTwinsLoss(lambda_param)(x, y)
    got_grads = torch.autograd.grad(got, (x, y))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_the_standardisation_is_lightlys_batch_norm_call():
    z_a, z_b = data(seed=2)
    na = F.batch_norm(z_a, running_mean=None, running_var=None, weight=None, bias=None, training=True)
    nb = F.batch_norm(z_b, running_mean=None, running_var=None, weight=None, bias=None, training=True)
    c = na.T @ nb / z_a.shape[0]
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    on = (torch.diagonal(c) - 1).pow(2).sum()
    got_on, got_off = BarlowTwinsLoss().terms(z_a, z_b)
    torch.testing.assert_close(got_on, on, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_off, off, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(BarlowTwinsLoss(0.25)(z_a, z_b), on + 0.25 * off)


def test_float32_and_bfloat16_inputs_compute_in_float32():
    z_a, z_b = data()
    want = BarlowTwinsLoss()(z_a, z_b)
    got = BarlowTwinsLoss()(z_a.float(), z_b.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert BarlowTwinsLoss()(z_a.bfloat16(), z_b.bfloat16()).dtype == torch.float32
    # autocast (the engine's bf16 on CUDA; here on the CPU) does not lower the products
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = BarlowTwinsLoss()(z_a.float(), z_b.float())
    assert autocast.dtype == torch.float32 and torch.equal(autocast, got)


def test_a_nan_in_either_view_gives_a_nan_loss():
    z_a, z_b = data()
    for which in (0, 1):
        views = [z_a.clone(), z_b.clone()]
        views[which][4, 1] = math.nan
        assert torch.isnan(BarlowTwinsLoss()(*views))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lambda_param": -1e-3}, "^lambda_param must be a finite number >= 0"),
        ({"lambda_param": math.nan}, "^lambda_param must be a finite number >= 0"),
        ({"lambda_param": False}, "^lambda_param must be a real number"),
        ({"gather": "yes"}, "^gather must be one of"),
    ],
)
def test_bad_settings_are_refused_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BarlowTwinsLoss(**kwargs)


def test_bad_embeddings_are_refused_naming_the_argument():
    z_a, z_b = data()
    for args, message in [
        ((z_a, z_b[:, :3]), "^z_b must have 6 columns"),
        ((z_a, z_b[:5]), r"^z_b must have the rows of z_a \(10\)"),
        ((z_a[:1], z_b[:1]), "^z_a must have at least 2 rows"),
        ((z_a, z_b.int()), "^z_b must be a floating-point tensor"),
    ]:
        with pytest.raises(ValueError, match=message):
            BarlowTwinsLoss()(*args)
