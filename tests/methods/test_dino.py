"""DINO as a method plugin: the head, the frozen last layer, the EMA teacher that evaluation uses,
the center, the teacher-temperature warm-up through the epoch, and exact state through a state dict."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from suncet.config import TrainConfig
from suncet.data import TrainBatch
from suncet.errors import ConfigError
from suncet.methods import MethodConfig
from suncet.plugins.backbones.resnet import small_resnet
from suncet.plugins.methods.dino import DINO

STEPS_PER_EPOCH = 3


def make_dino(seed=0, **options):
    torch.manual_seed(seed)
    backbone = small_resnet(in_channels=1, image_size=8, width=8)
    train = TrainConfig(proj_hidden=32, proj_dim=16, epochs=4, method_options={"out_dim": 24, **options})
    return DINO(backbone, MethodConfig(train, num_classes=10, steps_per_epoch=STEPS_PER_EPOCH))


def batch(step, n=12, local=2, labeled=True):
    g = torch.Generator().manual_seed(step)
    return TrainBatch(
        global_views=[torch.randn(n, 1, 8, 8, generator=g) for _ in range(2)],
        local_views=[torch.randn(n, 1, 6, 6, generator=g) for _ in range(local)],
        labeled=torch.randn(8, 1, 8, 8, generator=g) if labeled else None,
        labels=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]) if labeled else None,
        epoch=step // STEPS_PER_EPOCH,
        step=step,
    )


def train_steps(method, optimizer, steps):
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        terms = method(batch(step))
        terms["loss"].backward()
        optimizer.step()
        method.after_optimizer_step(step)
    return terms


def test_the_head_is_dinos_mlp_bottleneck_and_unit_prototypes():
    method = make_dino(head_layers=3)
    linears = [m for m in method.head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(method.backbone.feature_dim, 32), (32, 32), (32, 16)]
    assert sum(isinstance(m, torch.nn.GELU) for m in method.head.mlp) == 2
    features = torch.randn(5, method.backbone.feature_dim)
    embedding = method.project(features)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(5))
    out = method.head(features)
    torch.testing.assert_close(out, embedding @ F.normalize(method.head.last_layer.weight, dim=1).T)
    assert method.head.last_layer_magnitude is None
    free = make_dino(norm_last_layer=False, head_layers=1)
    assert free.head.last_layer_magnitude.shape == (24, 1) and free.head.last_layer_magnitude.requires_grad
    assert len(free.head.mlp) == 1


def test_the_last_layer_is_frozen_for_its_epochs_then_learns():
    method = make_dino(freeze_last_layer_epochs=1)  # the first 3 steps
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    before = method.head.last_layer.weight.detach().clone()
    for step in range(5):
        optimizer.zero_grad(set_to_none=True)
        terms = method(batch(step))
        assert set(terms) == {"loss", "dino", "suncet"}
        terms["loss"].backward()
        assert (method.head.last_layer.weight.grad is None) == (step < 3)
        assert method.head.mlp[0].weight.grad is not None
        optimizer.step()
        method.after_optimizer_step(step)
        if step == 2:
            assert torch.equal(method.head.last_layer.weight, before)
    assert not torch.equal(method.head.last_layer.weight, before)


def test_the_teacher_is_the_moving_average_of_backbone_and_head_and_evaluation_uses_it():
    method = make_dino(momentum_teacher=0.9)
    teacher = method.evaluated_backbone()
    assert teacher is method.teacher_backbone.target and type(teacher) is type(method.backbone)
    assert teacher.state_dict().keys() == method.backbone.state_dict().keys()
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert not {id(p) for p in trainable} & {id(p) for p in method.teacher_backbone.parameters()}
    assert not {id(p) for p in trainable} & {id(p) for p in method.teacher_head.parameters()}
    online = [*method.backbone.parameters(), *method.head.parameters()]
    target = [*method.teacher_backbone.parameters(), *method.teacher_head.parameters()]
    expected = [t.detach().double().clone() for t in target]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for step in range(2):
        train_steps(method, optimizer, [step])
        m = method.teacher_backbone.momentum(step)
        assert m == method.teacher_head.momentum(step) and 0.9 <= m < 1
        expected = [m * e + (1 - m) * o.detach().double() for e, o in zip(expected, online)]
    for got, want in zip(target, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_the_teacher_sees_the_large_crops_and_the_center_follows_its_outputs():
    method = make_dino()
    b = batch(0)
    with torch.no_grad():
        teacher = method.teacher_head(method.teacher_backbone(torch.cat(b.global_views)))
    method.train()
    method(b)
    torch.testing.assert_close(method.dino_loss.center.view(-1), 0.1 * teacher.mean(dim=0))
    method.eval()
    center = method.dino_loss.center.clone()
    method(b)
    assert torch.equal(method.dino_loss.center, center)  # evaluation leaves it


def test_the_teacher_temperature_warms_up_with_the_epoch():
    method = make_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, local_crops=0)
    method.eval()
    b = batch(0, local=0, labeled=False)
    features = method.encode(torch.cat(b.global_views))
    student = list(method.head(features).chunk(2))
    with torch.no_grad():
        teacher = list(method.teacher_head(method.teacher_backbone(torch.cat(b.global_views))).chunk(2))
    for epoch, temperature in ((0, 0.04), (1, 0.055), (2, 0.07), (3, 0.07)):
        views = TrainBatch(b.global_views, epoch=epoch, step=epoch * STEPS_PER_EPOCH + 9)
        got = method(views)["dino"]
        want = method.dino_loss(teacher, student, teacher_temp=temperature)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_teacher_center_and_student_come_back_exactly_through_the_state_dict():
    method = make_dino()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    train_steps(method, optimizer, range(4))
    restored = make_dino(seed=7)
    # Copies, as a checkpoint file holds them: a loaded optimizer state may share the saved tensors.
    restored.load_state_dict(copy.deepcopy(method.state_dict()))
    restored_optimizer = torch.optim.SGD([p for p in restored.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    restored_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert {"dino_loss.center"} <= set(method.state_dict())
    assert any(k.startswith("teacher_head.target.") for k in method.state_dict())
    assert not torch.equal(method.dino_loss.center, torch.zeros_like(method.dino_loss.center))
    a = train_steps(method, optimizer, range(4, 6))
    b = train_steps(restored, restored_optimizer, range(4, 6))
    assert torch.equal(a["loss"], b["loss"])
    for (name, x), y in zip(method.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize(
    "options",
    [
        {"out_dim": 0},
        {"head_layers": 0},
        {"local_crops": -1},
        {"teacher_temp": 0.0},
        {"student_temp": 1e-4},
        {"center_momentum": 1.5},
        {"momentum_teacher": -0.1},
        {"freeze_last_layer_epochs": -1.0},
        {"warmup_teacher_temp_epochs": -2},
    ],
)
def test_bad_options_are_refused_in_one_line(options):
    with pytest.raises(ConfigError, match="^dino options need out_dim >= 1, .*freeze_last_layer_epochs >= 0$"):
        make_dino(**options)
