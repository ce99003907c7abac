"""LARS against a step computed by hand, parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from suncet.optim import parameter_groups, warmup_cosine
from suncet.registry import OPTIMIZERS


def test_lars_matches_a_hand_computed_step():
    weight = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    bias = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    groups = [
        {"params": [weight], "weight_decay": 0.1, "lars_exclude": False},
        {"params": [bias], "weight_decay": 0.0, "lars_exclude": True},
    ]
    optimizer = OPTIMIZERS.create(
        "lars", groups, lr=0.5, weight_decay=0.1, momentum=0.9, options={"trust_coefficient": 0.001}
    )
    weight.grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    bias.grad = torch.tensor([2.0], dtype=torch.float64)
    optimizer.step()
    update = [1.0 + 0.1 * 3.0, 0.0 + 0.1 * 4.0]  # grad + wd * w
    trust = 0.001 * 5.0 / math.sqrt(update[0] ** 2 + update[1] ** 2)
    v1 = [0.5 * trust * u for u in update]
    expected = [3.0 - v1[0], 4.0 - v1[1]]
    assert weight.tolist() == pytest.approx(expected, rel=1e-12)
    assert bias.tolist() == pytest.approx([1.0 - 0.5 * 2.0], rel=1e-12)
    # second step: the momentum buffer carries the first
    w = list(weight.tolist())
    weight.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    bias.grad = torch.tensor([0.0], dtype=torch.float64)
    optimizer.step()
    update = [0.1 * w[0], 1.0 + 0.1 * w[1]]
    trust = 0.001 * math.hypot(*w) / math.hypot(*update)
    v2 = [0.9 * v1[i] + 0.5 * trust * update[i] for i in range(2)]
    assert weight.tolist() == pytest.approx([w[0] - v2[0], w[1] - v2[1]], rel=1e-12)
    assert bias.tolist() == pytest.approx([0.0 - 0.9 * 1.0], rel=1e-12)


def test_parameter_groups_exempt_biases_and_norms_by_type():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2))
    decayed, exempt = parameter_groups(model, 0.01)
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[4].weight)}
    assert {id(p) for p in exempt["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[3].weight),
        id(model[3].bias),
        id(model[4].bias),
    }
    assert decayed["weight_decay"] == 0.01 and exempt["weight_decay"] == 0.0 and exempt["lars_exclude"]


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_every_optimizer_plugin_takes_a_step(name):
    model = nn.Linear(3, 2)
    optimizer = OPTIMIZERS.create(name, parameter_groups(model, 0.1), lr=0.1, weight_decay=0.1, momentum=0.9)
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)


def test_schedule_values():
    total, warmup = 100, 10
    lr = [warmup_cosine(s, total, warmup, peak=1.0, start=0.1, final=0.0) for s in range(total + 1)]
    assert lr[0] == pytest.approx(0.1)
    assert lr[5] == pytest.approx(0.55)
    assert lr[10] == pytest.approx(1.0)
    assert lr[55] == pytest.approx(0.5)  # half-way through the decay, counted from the warm-up's end
    assert lr[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
