"""The public losses against float64 loops written here, independently of the library."""

from __future__ import annotations

import pytest
import torch

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
    loss, valid = contrastive_loss(rows, row_keys, k=cols, col_keys=col_keys, self_offset=rank * local, tau=0.2, backend="reference")
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


def check_losses_keep_non_finite(backend):
    """A NaN or an inf anywhere in the projections makes every loss that reads the row, and its
    gradient, non-finite: the masked means must not hide it, even on a row without a positive."""
    gen = torch.Generator().manual_seed(31)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])  # rows 4 and 5: singleton classes, no positive
    for value in (float("nan"), float("inf"), float("-inf")):
        for row in (1, 5):
            z_u = torch.randn(8, 6, generator=gen)
            z_l = torch.randn(6, 6, generator=gen)
            z_l[row, 2] = value
            z_l.requires_grad_(True)
            z_u.requires_grad_(True)
            suncet = suncet_loss(z_l, labels, backend=backend)
            assert not torch.isfinite(suncet), (backend, value, row)
            (grad,) = torch.autograd.grad(suncet, z_l)
            assert not torch.isfinite(grad).all(), (backend, value, row)
            _, both = nt_xent_and_suncet(z_u, z_l, labels, backend=backend)
            assert not torch.isfinite(both), (backend, value, row)
            z_u2 = z_u.detach().clone()
            z_u2[3, 0] = value
            assert not torch.isfinite(nt_xent(z_u2, backend=backend)), (backend, value)


def check_rows_that_see_a_non_finite_row_are_nan(backend):
    """docs/kernels.md, non-finite inputs: through the losses (which normalise first, so an inf
    becomes NaN), every row that sees a non-finite row, and that row itself, has a NaN loss on
    every backend; the cpu and cuda backends make every row NaN."""
    from suncet.kernels.reference import allowed_and_positive

    gen = torch.Generator().manual_seed(5)
    rows, keys = 40, torch.arange(40) % 5
    groups = (torch.arange(40) >= 20).long()
    for value in (float("nan"), float("inf"), float("-inf")):
        for towers in (1, 2):
            q, k = torch.randn(rows, 8, generator=gen), torch.randn(rows, 8, generator=gen)
            (q if towers == 1 else k)[33, 2] = value
            columns = None if towers == 1 else k
            loss, _ = contrastive_loss(q, keys, k=columns, col_keys=None if towers == 1 else keys, row_groups=groups,
                                       col_groups=None if towers == 1 else groups, self_offset=0 if towers == 1 else rows,
                                       tau=0.1, backend=backend)
            allowed, _ = allowed_and_positive(keys, keys, groups, groups, 0 if towers == 1 else rows)
            sees = allowed[:, 33].clone()
            sees[33] |= towers == 1
            assert torch.isnan(loss[sees]).all(), (backend, value, towers)
            if backend in ("cpu", "cuda"):
                assert torch.isnan(loss).all(), (backend, value, towers)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rows_that_see_a_non_finite_row_are_nan(backend):
    check_rows_that_see_a_non_finite_row_are_nan(backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_finite_projections_give_non_finite_losses(backend):
    from suncet.kernels import backend_status

    if not backend_status()[backend][0]:
        pytest.skip(backend_status()[backend][1])
    check_losses_keep_non_finite(backend)
