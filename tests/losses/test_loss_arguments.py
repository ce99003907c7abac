"""What the loss modules accept, as a new user would call them: every refusal is one-line
ValueError naming the argument as the caller wrote it; what is meaningful is computed right
(tested against the reference backend and float64 formulas where a value is involved)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from suncet.losses import (
    MultiPositiveContrastiveLoss,
    NTXentLoss,
    NTXentSuNCEtLoss,
    PAWSLoss,
    SuNCEtLoss,
    SwAVLoss,
    nt_xent,
    suncet_loss,
)

Z = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 3, 1, 1, 4, 2])


def refused(call, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("labels", [Y.float() + 0.3, Y.double(), torch.full((12,), float("nan")), Y.bool()])
def test_labels_that_are_not_integers_are_refused(labels):
    refused(lambda: SuNCEtLoss()(Z, labels), "^labels must hold integer class indices, got torch")
    refused(lambda: NTXentSuNCEtLoss()(Z[:4], Z[4:8], Z, labels), "^labels must hold integer class indices")
    refused(lambda: MultiPositiveContrastiveLoss()(Z, labels), "^labels must hold integer class indices")


def test_labels_as_a_list_or_of_the_wrong_shape_are_named():
    refused(lambda: SuNCEtLoss()(Z, Y.tolist()), "^labels must be a tensor of integer class indices, got list")
    refused(
        lambda: SuNCEtLoss()(Z, Y[:5]), r"^labels must be 1-D with one class index per row \(12\), got shape \(5,\)"
    )
    refused(lambda: SuNCEtLoss()(Z, Y[:, None]), r"^labels must be 1-D .* got shape \(12, 1\)")
    refused(
        lambda: MultiPositiveContrastiveLoss()(Z, Y, Z[:5], Y.float()[:5]),
        "^ref_labels must hold integer class indices",
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_embeddings_that_are_not_real_floating_point_are_refused(dtype):
    z = Z.to(dtype) if dtype != torch.complex64 else torch.complex(Z, Z)
    refused(lambda: NTXentLoss()(z[:6], z[6:]), "^out0 must be a floating-point tensor, got torch")
    refused(lambda: SuNCEtLoss()(z, Y), "^embeddings must be a floating-point tensor, got torch")
    refused(lambda: NTXentSuNCEtLoss()(Z[:4], Z[4:8], z, Y), "^labeled must be a floating-point tensor")
    refused(lambda: MultiPositiveContrastiveLoss()(Z, Y, z, Y), "^ref_emb must be a floating-point tensor")
    refused(lambda: SwAVLoss()([z[:, :5], z[:, :5]]), r"^high_resolution_outputs\[0\] must be a floating-point tensor")


def test_embeddings_of_the_wrong_shape_are_named():
    refused(lambda: SuNCEtLoss()(Z[0], Y[:1]), r"^embeddings must be 2-D \[rows, dim\], got shape \(8,\)")
    refused(lambda: NTXentLoss()(Z[:6], Z[6:, :4]), r"^out0 and out1 must have the same shape")
    refused(
        lambda: NTXentSuNCEtLoss()(Z[:4], Z[4:8], Z[:, :3], Y),
        "^labeled must have 8 columns like the other embeddings, got 3",
    )
    refused(lambda: nt_xent(Z[:11]), "^NT-Xent needs .* an even count; got 11")


def test_negative_labels_are_classes_like_any_other():
    # The losses compare labels for equality only: shifting every label keeps the loss.
    for backend in ("reference", "cpu"):
        shifted = SuNCEtLoss(backend=backend)(Z, Y - 7)
        torch.testing.assert_close(shifted, SuNCEtLoss(backend=backend)(Z, Y))


@pytest.mark.parametrize(
    "bad", [0.0, -0.1, 1e-39, 1e-5, float("nan"), float("inf"), True, "0.1", 1j, torch.tensor([0.1, 0.2]), None]
)
def test_bad_temperatures_are_refused(bad):
    for make in (NTXentLoss, SuNCEtLoss, NTXentSuNCEtLoss, MultiPositiveContrastiveLoss, SwAVLoss, PAWSLoss):
        refused(lambda: make(temperature=bad), "^temperature must be a (finite number >= 0.001|real number), got ")
    refused(lambda: suncet_loss(Z, Y, bad), "^tau must be a ")


@pytest.mark.parametrize("value", [np.float32(0.2), np.float64(0.2), torch.tensor(0.2), torch.tensor([0.2]), 0.2])
def test_numpy_and_tensor_scalars_are_temperatures(value):
    want = NTXentLoss(0.2, backend="reference")(Z[:6], Z[6:])
    torch.testing.assert_close(NTXentLoss(value, backend="reference")(Z[:6], Z[6:]), want)
    assert isinstance(NTXentLoss(value).temperature, float)


def test_the_smallest_temperature_is_computed_right():
    # At the bound the fused kernels still match float64 to 1e-4 in the gradient.
    z = Z.double().requires_grad_()
    want = SuNCEtLoss(1e-3, backend="reference")(z, Y)
    (want_grad,) = torch.autograd.grad(want, z)
    x = Z.clone().requires_grad_()
    got = SuNCEtLoss(1e-3, backend="cpu")(x, Y)
    (grad,) = torch.autograd.grad(got, x)
    assert torch.isfinite(got) and abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    assert ((grad.double() - want_grad).norm() / want_grad.norm()).item() <= 1e-4


def test_swav_needs_floating_scores_and_two_crops():
    scores = F.normalize(Z, dim=1)[:, :5]
    refused(
        lambda: SwAVLoss()([scores.long(), scores.long()]), r"^high_resolution_outputs\[0\] must be a floating-point"
    )
    refused(
        lambda: SwAVLoss()([scores]),
        "^SwAV predicts each high-resolution crop's code from another crop: .* got 1 and 0",
    )
    refused(lambda: SwAVLoss()([], [scores, scores]), ".* got 0 and 2")
    refused(lambda: SwAVLoss()([scores], [scores.int()]), r"^low_resolution_outputs\[0\] must be a floating-point")
    assert torch.isfinite(SwAVLoss()([scores], [scores]))  # one high and one low crop: a pair
    refused(lambda: SwAVLoss(sinkhorn_iterations=2.0), "^sinkhorn_iterations must be an integer >= 1")


@pytest.mark.parametrize("bad", ["no", 0, 1, None])
def test_paws_me_max_is_a_flag(bad):
    refused(lambda: PAWSLoss(me_max=bad), "^me_max must be True or False, got ")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_paws_num_classes_is_a_positive_integer(bad):
    refused(lambda: PAWSLoss(num_classes=bad), "^num_classes must be an integer >= 1, got ")


def test_paws_labels_are_class_indices_within_its_classes():
    loss = PAWSLoss(multicrop=0, num_classes=3)
    views, supports = Z[:8], Z[8:12]
    refused(
        lambda: loss(views, supports, torch.tensor([0, 1, 2, 3]), views[:8], supports, torch.tensor([0, 1, 2, 2])),
        r"^anchor_support_labels must be class indices in \[0, 3\), got values from 0 to 3",
    )
    refused(
        lambda: loss(views, supports, torch.tensor([0, 1, 2, 2.0]), views, supports, torch.tensor([0, 1, 2, 2])),
        "^anchor_support_labels must hold integer class indices",
    )
    refused(
        lambda: loss(views.long(), supports, torch.tensor([0, 1, 2, 2]), views, supports, torch.tensor([0, 1, 2, 2])),
        "^anchor_views must be a floating-point tensor",
    )


def _l_in(z, labels, ref, ref_labels, own_column_out):
    """float64 loop: per row, -log(sum over positive reference rows / sum over reference rows),
    leaving out reference row i for row i when ``own_column_out``; the mean over rows with a positive."""
    z, ref = F.normalize(z.double(), dim=1), F.normalize(ref.double(), dim=1)
    losses = []
    for i in range(len(z)):
        seen = [j for j in range(len(ref)) if not (own_column_out and j == i)]
        s = torch.stack([z[i] @ ref[j] / 0.2 for j in seen])
        positive = torch.tensor([bool(ref_labels[j] == labels[i]) for j in seen])
        if positive.any():
            losses.append(torch.logsumexp(s, 0) - torch.logsumexp(s[positive], 0))
    return torch.stack(losses).mean()


def test_ref_labels_that_are_labels_leave_out_each_rows_own_column():
    # As pytorch-metric-learning, which leaves out the diagonal when ref_labels is labels:
    # loss(z, y, z, y) is loss(z, y), and row i never sees reference row i.
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    other = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    pairs = torch.arange(6).repeat(2)  # one positive per row among the others: NT-Xent is the L_in form
    for backend in ("reference", "cpu"):
        loss = MultiPositiveContrastiveLoss(0.2, backend=backend)
        torch.testing.assert_close(loss(Z, Y, Z, Y), loss(Z, Y))
        torch.testing.assert_close(
            loss(Z, pairs, other, pairs), pml.NTXentLoss(temperature=0.2)(Z, pairs, ref_emb=other, ref_labels=pairs)
        )
        torch.testing.assert_close(loss(Z, Y, other, Y).double(), _l_in(Z, Y, other, Y, own_column_out=True))
        # Equal labels in another tensor: a reference set of its own, row i's column included.
        torch.testing.assert_close(loss(Z, Y, other, Y.clone()).double(), _l_in(Z, Y, other, Y, own_column_out=False))
    refused(
        lambda: MultiPositiveContrastiveLoss()(Z, Y, other[:5], Y),
        "^ref_labels is labels, so ref_emb needs 12 rows, got 5",
    )
