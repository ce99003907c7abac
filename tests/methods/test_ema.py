"""The one EMA helper of BYOL, MoCo and DINO: BYOL's cosine momentum schedule, the update against a
float64 loop, a frozen target, and exact state through a state dict."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from suncet.ema import EMA
from suncet.errors import ConfigError


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def test_momentum_rises_on_a_half_cosine_from_base_to_final():
    ema = EMA(network(), total_steps=100, base_momentum=0.996)
    for step in (0, 1, 37, 50, 99, 100, 250):
        k = min(step, 100)
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * k / 100) + 1) / 2  # BYOL, eq. (7) of its paper
        assert ema.momentum(step) == pytest.approx(expected, abs=1e-15)
    constant = EMA(network(), total_steps=10, base_momentum=0.999, final_momentum=0.999)
    assert all(constant.momentum(s) == pytest.approx(0.999, abs=1e-15) for s in range(12))


def test_update_is_the_moving_average_of_every_parameter_and_leaves_buffers_alone():
    online = network()
    ema = EMA(online, total_steps=20, base_momentum=0.9)
    assert all(not p.requires_grad for p in ema.target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    expected = [p.detach().double().clone() for p in ema.target.parameters()]
    buffers = [b.clone() for b in ema.target.buffers()]
    for step in range(3):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p))
            online[1].running_mean.add_(1.0)
        m = ema.momentum(step)
        expected = [m * e + (1 - m) * p.detach().double() for e, p in zip(expected, online.parameters())]
        ema.update(online, step)
    for got, want in zip(ema.target.parameters(), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for got, want in zip(ema.target.buffers(), buffers):
        assert torch.equal(got, want)


def test_state_comes_back_exactly_through_a_state_dict():
    online = network()
    ema = EMA(online, total_steps=5, base_momentum=0.5)
    with torch.no_grad():
        for p in online.parameters():
            p.mul_(3.0)
    ema.update(online, 0)
    restored = EMA(network(), total_steps=5, base_momentum=0.5)
    restored.load_state_dict(ema.state_dict())
    for a, b in zip(restored.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs", [{"base_momentum": 1.5}, {"base_momentum": float("nan")}, {"final_momentum": -0.1}, {"total_steps": 0}]
)
def test_bad_settings_are_refused_in_one_line(kwargs):
    settings = {"total_steps": 10, "base_momentum": 0.99, **kwargs}
    with pytest.raises(ConfigError):
        EMA(network(), **settings)


def test_update_refuses_another_network():
    ema = EMA(network(), total_steps=10, base_momentum=0.99)
    with pytest.raises(ConfigError, match="copied from"):
        ema.update(nn.Linear(5, 3), 0)
