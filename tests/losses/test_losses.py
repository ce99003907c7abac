"""The public losses against float64 loops written here, independently of the library."""

from __future__ import annotations

import pytest
import torch
from conftest import check_losses_keep_non_finite, check_rows_that_see_a_non_finite_row_are_nan

from suncet.losses import contrastive_loss, nt_xent, nt_xent_and_suncet, suncet_loss


def loop_row_losses(q, k, row_keys, col_keys, row_groups, col_groups, offset, tau):
    """Per-row loss of every row that has a positive, by explicit loops in float64."""
    qn = [row / row.norm() for row in q]
    kn = qn if k is None else [col / col.norm() for col in k]
    col_keys = row_keys if col_keys is None else col_keys
    col_groups = row_groups if col_groups is None else col_groups
    out = {}
    for i in range(len(qn)):
        seen, positives = [], []
        for j in range(len(kn)):
            if int(row_groups[i]) != int(col_groups[j]) or j == i + offset:
                continue
            s = (qn[i] * kn[j]).sum() / tau
            seen.append(s)
            if int(row_keys[i]) == int(col_keys[j]):
                positives.append(s)
        if positives:
            out[i] = torch.logsumexp(torch.stack(seen), 0) - torch.logsumexp(torch.stack(positives), 0)
    return out


def loop_mean(losses):
    return torch.stack(list(losses.values())).mean() if losses else torch.zeros((), dtype=torch.float64)


def check_value_and_grad(fn, loop_fn, z, rtol=1e-5):
    z64 = z.detach().double().requires_grad_(True)
    expected = loop_fn(z64)
    z_in = z.detach().clone().requires_grad_(True)
    got = fn(z_in)
    torch.testing.assert_close(got.double(), expected.detach(), rtol=rtol, atol=1e-6)
    got.backward()
    if expected.requires_grad:
        (expected_grad,) = torch.autograd.grad(expected, z64)
    else:
        expected_grad = torch.zeros_like(z64)
    torch.testing.assert_close(z_in.grad.double(), expected_grad, rtol=rtol * 10, atol=1e-6)


@pytest.mark.parametrize("batch,dim", [(1, 3), (3, 17), (8, 5), (13, 64)])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5])
def test_nt_xent_matches_loops(batch, dim, tau):
    torch.manual_seed(batch * 100 + dim)
    z = torch.randn(2 * batch, dim)
    ids = torch.arange(2 * batch) % batch
    zeros = torch.zeros(2 * batch, dtype=torch.long)
    check_value_and_grad(
        lambda x: nt_xent(x, tau, backend="reference"),
        lambda x: loop_mean(loop_row_losses(x, None, ids, None, zeros, None, 0, tau)),
        z,
    )


@pytest.mark.parametrize(
    "labels",
    [
        [0, 0, 1, 1, 2, 2, 3],  # class 3 is a singleton: dropped from the mean
        [4, 4, 4, 4, 4],  # all rows one class
        [0, 1, 0, 2, 1, 0, 3, 3, 2, 1, 0],  # odd count
    ],
)
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5])
def test_suncet_matches_loops(labels, tau):
    torch.manual_seed(len(labels))
    y = torch.tensor(labels)
    z = torch.randn(len(labels), 9)
    zeros = torch.zeros(len(labels), dtype=torch.long)
    check_value_and_grad(
        lambda x: suncet_loss(x, y, tau, backend="reference"),
        lambda x: loop_mean(loop_row_losses(x, None, y, None, zeros, None, 0, tau)),
        z,
    )


def test_suncet_without_positives_is_zero_with_zero_gradient():
    z = torch.randn(6, 4, requires_grad=True)
    loss = suncet_loss(z, torch.arange(6), 0.05, backend="reference")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_suncet_large_similarities_stay_finite():
    z = torch.randn(8, 16) * 1e3
    z[1] = z[0]  # identical rows: similarity 1/tau = 20 at tau 0.05
    loss = suncet_loss(z.requires_grad_(), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 0.05, backend="reference")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_two_block_layout_equals_separate_terms():
    torch.manual_seed(1)
    zu, zl = torch.randn(10, 8), torch.randn(7, 8)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    both = nt_xent_and_suncet(zu, zl, labels, 0.1, backend="reference")
    torch.testing.assert_close(both[0], nt_xent(zu, 0.1, backend="reference"))
    torch.testing.assert_close(both[1], suncet_loss(zl, labels, 0.1, backend="reference"))


def test_cross_layout_with_self_offset_matches_loops():
    """Local rows against gathered columns, the self-column at the rank's offset."""
    torch.manual_seed(2)
    world, local = 3, 5
    cols = torch.randn(world * local, 6, dtype=torch.float64)
    col_keys = torch.randint(0, 4, (world * local,))
    rank = 1
    rows = cols[rank * local : (rank + 1) * local]
    row_keys = col_keys[rank * local : (rank + 1) * local]
    loss, valid = contrastive_loss(
        rows, row_keys, k=cols, col_keys=col_keys, self_offset=rank * local, tau=0.2, backend="reference"
    )
    expected = loop_row_losses(
        rows, cols, row_keys, col_keys, torch.zeros(local), torch.zeros(world * local), rank * local, 0.2
    )
    assert valid.tolist() == [i in expected for i in range(local)]
    for i, value in expected.items():
        torch.testing.assert_close(loss[i].double(), value, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_accumulate_in_fp32():
    torch.manual_seed(4)
    z = torch.randn(24, 32).bfloat16()
    y = torch.randint(0, 5, (24,))
    got = suncet_loss(z, y, 0.1, backend="reference")
    assert got.dtype == torch.float32
    zeros = torch.zeros(24, dtype=torch.long)
    expected = loop_mean(loop_row_losses(z.double(), None, y, None, zeros, None, 0, 0.1))
    assert abs(got.item() - expected.item()) <= 1e-2 * abs(expected.item())


@pytest.mark.parametrize("bad", [0.0, -0.1])
def test_non_positive_tau_is_rejected(bad):
    with pytest.raises(ValueError, match="tau"):
        nt_xent(torch.randn(4, 3), bad)


def test_odd_rows_are_rejected_by_nt_xent():
    with pytest.raises(ValueError, match="even"):
        nt_xent(torch.randn(5, 3))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rows_that_see_a_non_finite_row_are_nan(backend):
    check_rows_that_see_a_non_finite_row_are_nan(backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_finite_projections_give_non_finite_losses(backend):
    from suncet.kernels import backend_status

    if not backend_status()[backend][0]:
        pytest.skip(backend_status()[backend][1])
    check_losses_keep_non_finite(backend)
