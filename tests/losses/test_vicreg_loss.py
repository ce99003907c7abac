"""VICRegLoss against a float64 transcription of lightly's formula (lightly-ai/lightly,
lightly/loss/vicreg_loss.py at e8d317f: ``VICRegLoss.forward``, ``invariance_loss``,
``variance_loss``, ``covariance_loss``), which is the authors' (facebookresearch/vicreg,
main_vicreg.py, ``VICReg.forward``): values, gradients, its three terms, bad settings, NaN."""

from __future__ import annotations

import math

import pytest
import torch

from suncet.losses import VICRegLoss


def data(rows=10, dim=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # a small scale puts some dimensions' std below 1 (the hinge active) and some above
    scale = torch.linspace(0.3, 2.0, dim, dtype=dtype)
    return torch.randn(rows, dim, generator=g, dtype=dtype) * scale, torch.randn(rows, dim, generator=g, dtype=dtype)


def lightly_vicreg_terms(z_a, z_b, eps):
    """Plain loops in float64: invariance = mean squared difference over every entry (F.mse_loss);
    variance = mean over dimensions of relu(1 - sqrt(unbiased var + eps)), averaged over the views;
    covariance = per view, sum of squared off-diagonal entries of the unbiased covariance / dim,
    summed over the views."""
    n, d = z_a.shape
    invariance = sum((z_a[i, j] - z_b[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def variance(z):
        total = 0.0
        for j in range(d):
            mean = sum(z[i, j] for i in range(n)) / n
            var = sum((z[i, j] - mean) ** 2 for i in range(n)) / (n - 1)
            total = total + torch.clamp(1.0 - torch.sqrt(var + eps), min=0.0)
        return total / d

    def covariance(z):
        means = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
        total = 0.0
        for j in range(d):
            for k in range(d):
                if j != k:
                    cov = sum((z[i, j] - means[j]) * (z[i, k] - means[k]) for i in range(n)) / (n - 1)
                    total = total + cov**2
        return total / d

    return invariance, 0.5 * (variance(z_a) + variance(z_b)), covariance(z_a) + covariance(z_b)


def lightly_vicreg(z_a, z_b, lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4):
    inv, var, cov = lightly_vicreg_terms(z_a, z_b, eps)
    return lambda_param * inv + mu_param * var + nu_param * cov


@pytest.mark.parametrize(
    "settings", [{}, {"lambda_param": 5.0, "mu_param": 10.0, "nu_param": 2.0, "eps": 1e-2}, {"nu_param": 0.0}]
)
def test_value_and_gradients_equal_lightlys_formula(settings):
    z_a, z_b = data()
    a, b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    want = lightly_vicreg(a, b, **settings)
    want_grads = torch.autograd.grad(want, (a, b))
    x, y = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    got = VICRegLoss(**settings)(x, y)
    got_grads = torch.autograd.grad(got, (x, y))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_the_terms_are_lightlys_unweighted_terms_and_make_the_loss():
    z_a, z_b = data(seed=1)
    loss = VICRegLoss(lambda_param=3.0, mu_param=4.0, nu_param=5.0)
    terms = loss.terms(z_a, z_b)
    for got, want in zip(terms, lightly_vicreg_terms(z_a, z_b, 1e-4)):
        torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss(z_a, z_b), 3.0 * terms[0] + 4.0 * terms[1] + 5.0 * terms[2])


def test_float32_and_bfloat16_inputs_compute_in_float32():
    z_a, z_b = data()
    want = VICRegLoss()(z_a, z_b)
    got = VICRegLoss()(z_a.float(), z_b.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert VICRegLoss()(z_a.bfloat16(), z_b.bfloat16()).dtype == torch.float32
    # autocast (the engine's bf16 on CUDA; here on the CPU) does not lower the products
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = VICRegLoss()(z_a.float(), z_b.float())
    assert autocast.dtype == torch.float32 and torch.equal(autocast, got)


def test_a_nan_in_either_view_gives_a_nan_loss():
    z_a, z_b = data()
    for which in (0, 1):
        views = [z_a.clone(), z_b.clone()]
        views[which][3, 2] = math.nan
        assert torch.isnan(VICRegLoss()(*views))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lambda_param": -1.0}, "^lambda_param must be a finite number >= 0"),
        ({"mu_param": math.inf}, "^mu_param must be a finite number >= 0"),
        ({"nu_param": "1"}, "^nu_param must be a real number"),
        ({"eps": 0.0}, "^eps must be a finite number > 0"),
        ({"eps": True}, "^eps must be a real number"),
        ({"gather": "all"}, "^gather must be one of"),
    ],
)
def test_bad_settings_are_refused_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VICRegLoss(**kwargs)


def test_bad_embeddings_are_refused_naming_the_argument():
    z_a, z_b = data()
    for args, message in [
        ((z_a, z_b[:, :3]), "^z_b must have 6 columns"),
        ((z_a, z_b[:5]), r"^z_b must have the rows of z_a \(10\)"),
        ((z_a[:1], z_b[:1]), "^z_a must have at least 2 rows"),
        ((z_a.long(), z_b), "^z_a must be a floating-point tensor"),
        ((z_a[0], z_b), r"^z_a must be 2-D"),
    ]:
        with pytest.raises(ValueError, match=message):
            VICRegLoss()(*args)
