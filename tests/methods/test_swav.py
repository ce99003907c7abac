"""SwAV: Sinkhorn codes, the swapped-prediction loss, prototypes, the queue, and CLI runs."""

from __future__ import annotations

import math

import pytest
import torch

from suncet.config import TrainConfig
from suncet.data import TrainBatch
from suncet.losses import sinkhorn, swapped_prediction_loss
from suncet.methods import MethodConfig
from suncet.plugins.backbones.resnet import small_resnet
from suncet.plugins.methods.swav import SwAV


def loop_sinkhorn(scores, eps, iters):
    """Sinkhorn-Knopp by explicit loops in float64 (SwAV's algorithm, no stabilisation)."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[i][j] / eps) for i in range(b)] for j in range(k)]  # [K][B]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        for j in range(k):
            s = sum(q[j])
            q[j] = [v / s / k for v in q[j]]
        for i in range(b):
            s = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / s / b
    return [[q[j][i] * b for j in range(k)] for i in range(b)]


def test_sinkhorn_matches_loops():
    torch.manual_seed(0)
    scores = torch.randn(7, 5).clamp(-1, 1)
    expected = torch.tensor(loop_sinkhorn(scores.double().tolist(), 0.05, 3), dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(scores.double(), 0.05, 3), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("batch,prototypes", [(64, 10), (33, 7), (1, 5)])
def test_sinkhorn_marginals(batch, prototypes):
    torch.manual_seed(batch)
    scores = (
        torch.nn.functional.normalize(torch.randn(batch, 16), dim=1)
        @ torch.nn.functional.normalize(torch.randn(prototypes, 16), dim=1).T
    )
    codes = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(batch))
    assert (codes >= 0).all()
    converged = sinkhorn(scores.double(), 0.05, 200)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(batch, dtype=torch.float64))
    if batch > 1:
        torch.testing.assert_close(
            converged.sum(dim=0),
            torch.full((prototypes,), batch / prototypes, dtype=torch.float64),
            rtol=1e-4,
            atol=1e-6,
        )


def test_sinkhorn_is_safe_for_large_scores_and_ties():
    scores = torch.randn(16, 8) * 20  # scores / eps up to ~ 1e3
    codes = sinkhorn(scores, 0.05, 3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(16))
    tied = sinkhorn(torch.full((6, 3), 0.7), 0.05, 3)
    torch.testing.assert_close(tied, torch.full((6, 3), 1 / 3))


def test_swapped_prediction_matches_loops():
    torch.manual_seed(1)
    scores = [torch.randn(4, 5, dtype=torch.float64) for _ in range(3)]
    codes = [torch.softmax(torch.randn(4, 5, dtype=torch.float64), dim=1) for _ in range(2)]
    tau = 0.1
    total, pairs = 0.0, 0
    for a in range(2):
        for v in range(3):
            if v == a:
                continue
            for i in range(4):
                row = [s / tau for s in scores[v][i].tolist()]
                lse = math.log(sum(math.exp(x) for x in row))
                total += -sum(q * (x - lse) for q, x in zip(codes[a][i].tolist(), row)) / 4
            pairs += 1
    assert swapped_prediction_loss(scores, codes, tau).item() == pytest.approx(total / pairs, rel=1e-5)


def make_swav(**options):
    backbone = small_resnet(in_channels=1, image_size=8, width=8)
    config = MethodConfig(
        TrainConfig(proj_hidden=32, proj_dim=16, method_options=options), num_classes=10, steps_per_epoch=3
    )
    return SwAV(backbone, config)


def batch(step, epoch=0, n=12, local=2, labeled=True):
    g = torch.Generator().manual_seed(step)
    views = [torch.randn(n, 1, 8, 8, generator=g) for _ in range(2)]
    return TrainBatch(
        global_views=views,
        local_views=[torch.randn(n, 1, 6, 6, generator=g) for _ in range(local)],
        labeled=torch.randn(8, 1, 8, 8, generator=g) if labeled else None,
        labels=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]) if labeled else None,
        epoch=epoch,
        step=step,
    )


def test_prototypes_are_frozen_then_learn_and_stay_normalised():
    torch.manual_seed(0)
    method = make_swav(local_crops=2, freeze_prototypes_epochs=1)  # 3 frozen steps
    assert method.prototypes.weight.shape == (30, 16)  # three per class
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    before = method.prototypes.weight.detach().clone()
    for step in range(5):
        optimizer.zero_grad(set_to_none=True)
        out = method(batch(step))
        assert set(out) == {"loss", "swav", "suncet"}
        out["loss"].backward()
        assert (method.prototypes.weight.grad is None) == (step < 3)
        optimizer.step()
        method.after_optimizer_step(step)
        if step == 2:
            torch.testing.assert_close(method.prototypes.weight, before)  # only re-normalised
    assert not torch.allclose(method.prototypes.weight, before)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(30))


def test_queue_fills_with_the_newest_embeddings_and_changes_the_codes():
    torch.manual_seed(0)
    method = make_swav(local_crops=0, queue_length=24, queue_start_epoch=1)
    method(batch(0, epoch=0, labeled=False))
    assert int(method.queue_filled) == 0  # the queue starts at epoch 1
    method(batch(1, epoch=1, labeled=False))
    assert int(method.queue_filled) == 12
    b = batch(2, epoch=1, labeled=False)
    method(b)
    assert int(method.queue_filled) == 24
    with torch.no_grad():
        newest = method.project(method.backbone(torch.cat(b.global_views)))[
            :12
        ]  # the same batch, so the same BN statistics
    torch.testing.assert_close(method.queue[0][:12], newest)
    scores = newest @ method.prototypes.weight.T
    with_queue = method.swav_loss.codes(scores, method._queued_scores(2, epoch=1)[0])
    assert not torch.allclose(with_queue, sinkhorn(scores, 0.05, 3))


def test_swav_cli_runs_with_and_without_labels(cli, tmp_path):
    small = (
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--proj-hidden",
        "64",
        "--backbone-opt",
        "width=8",
        "--method-opt",
        "local_crops=2",
        "--final-eval",
        "knn",
    )
    result = cli("train", "--method", "swav", "--labels", "10%", *small, "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    header = (tmp_path / "a" / "metrics.csv").read_text().splitlines()[0]
    assert "swav" in header and "suncet" in header
    result = cli("train", "--method", "swav", "--labels", "0%", *small, "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    assert "suncet" not in (tmp_path / "b" / "metrics.csv").read_text().splitlines()[0]
