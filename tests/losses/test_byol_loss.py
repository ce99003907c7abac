"""NegativeCosineSimilarity (BYOL's regression loss) against a float64 transcription of
lightly's ``lightly/loss/negative_cosine_similarity.py`` (``-cosine_similarity(x0, x1, dim=1,
eps).mean()``, torch's cosine with each norm floored at eps) and of BYOL's own
``helpers.regression_loss`` (``byol/utils/helpers.py`` and ``byol/byol_experiment.py`` of
google-deepmind/deepmind-research: ``|x/|x| - y/|y||^2`` per row, summed over the two directions)."""

from __future__ import annotations

import math

import pytest
import torch

from suncet.losses import NegativeCosineSimilarity


def rows(seed: int, n: int = 9, d: int = 6) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def lightly_negative_cosine(x0: torch.Tensor, x1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    total = 0.0
    for a, b in zip(x0, x1):
        na = max(math.sqrt(sum(float(v) ** 2 for v in a)), eps)
        nb = max(math.sqrt(sum(float(v) ** 2 for v in b)), eps)
        total -= sum(float(u) * float(v) for u, v in zip(a, b)) / (na * nb)
    return total / len(x0)


def byol_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's per-row |p/|p| - z/|z||^2, as its helpers compute it (float64 tensors)."""
    return ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1)


def test_value_and_gradients_equal_lightlys_formula():
    x0, x1 = rows(0).requires_grad_(), rows(1).requires_grad_()
    loss = NegativeCosineSimilarity()(x0, x1)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(lightly_negative_cosine(x0.detach(), x1.detach()), abs=1e-12)
    got = torch.autograd.grad(loss, (x0, x1))
    # The transcription's gradient by central differences of the float64 loop.
    for x, g in zip((x0, x1), got):
        numeric = torch.zeros_like(x)
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                step = torch.zeros_like(x)
                step[i, j] = 1e-6
                args = [x0.detach(), x1.detach()]
                which = 0 if x is x0 else 1
                plus = list(args)
                minus = list(args)
                plus[which], minus[which] = args[which] + step, args[which] - step
                numeric[i, j] = (lightly_negative_cosine(*plus) - lightly_negative_cosine(*minus)) / 2e-6
        torch.testing.assert_close(g, numeric, rtol=1e-6, atol=1e-8)


def test_byols_symmetric_regression_loss_is_four_plus_twice_the_two_directions():
    p0, p1, z0, z1 = (rows(s) for s in range(4))
    ncs = NegativeCosineSimilarity()
    byol = (byol_regression(p0, z1) + byol_regression(p1, z0)).mean()
    torch.testing.assert_close(4 + 2 * (ncs(p0, z1) + ncs(p1, z0)), byol, rtol=0, atol=1e-12)


def test_a_zero_row_uses_the_eps_floor_and_low_precision_is_computed_in_fp32():
    x0, x1 = rows(0), rows(1)
    x1[2] = 0.0
    assert NegativeCosineSimilarity(eps=1e-3)(x0, x1).item() == pytest.approx(
        lightly_negative_cosine(x0, x1, 1e-3), abs=1e-12
    )
    half = NegativeCosineSimilarity()(x0.bfloat16(), x1.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(
        lightly_negative_cosine(x0.bfloat16().double(), x1.bfloat16().double()), abs=1e-6
    )


def test_a_nan_anywhere_gives_a_nan_loss():
    x0, x1 = rows(0), rows(1)
    x1[4, 3] = float("nan")
    assert math.isnan(NegativeCosineSimilarity()(x0, x1).item())


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: NegativeCosineSimilarity(eps=0.0), "eps must be a finite number > 0"),
        (lambda: NegativeCosineSimilarity(eps=float("inf")), "eps must be a finite number > 0"),
        (lambda: NegativeCosineSimilarity(eps=True), "eps must be a real number"),
        (lambda: NegativeCosineSimilarity()(rows(0), rows(1, n=4)), "x0 and x1 must have the same shape"),
        (lambda: NegativeCosineSimilarity()(rows(0)[0], rows(1)[0]), "x0 must be 2-D"),
        (lambda: NegativeCosineSimilarity()(rows(0), torch.ones(9, 6, dtype=torch.long)), "x1 must be a floating"),
    ],
)
def test_bad_arguments_are_refused_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()
