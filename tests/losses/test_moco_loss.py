"""MoCoLoss against a float64 transcription of lightly's NT-Xent with a memory bank
(lightly-ai/lightly: ``lightly/loss/ntx_ent_loss.py``, ``NTXentLoss.forward`` with
``memory_bank_size > 0``, and ``lightly/models/modules/memory_bank.py``, ``MemoryBankModule``):
the logits of row i are ``[q_i . k_i, q_i . bank_j ...] / t`` on normalised rows with the bank as
it was before the call, cross-entropy to column 0, mean over rows; then, when ``out0`` requires a
gradient, the normalised keys enter the bank at its pointer, a batch reaching the end filling it
to the end and putting the pointer back to 0 (its other keys dropped). The bank starts as
``normalize(randn(K, D))``. Values and gradients over several steps, wrap-around included."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rerun_under_triton_interpreter, skip_unless_triton_interpreter

from suncet.kernels import backend_status, set_fp32_precision
from suncet.losses import MoCoLoss

CPU_BACKENDS = [b for b in ("reference", "cpu") if backend_status()[b][0]]


class LightlyMemoryBankNTXent:
    """The transcription: plain float64 code, one loop over the rows."""

    def __init__(self, bank: torch.Tensor, temperature: float):
        self.bank, self.ptr, self.t = bank.double().clone(), 0, temperature

    def __call__(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        negatives = self.bank.clone()
        total = 0
        for i in range(out0.shape[0]):
            logits = [out0[i] @ out1[i] / self.t] + [out0[i] @ negatives[j] / self.t for j in range(len(negatives))]
            logits = torch.stack(logits)
            total = total - (logits[0] - torch.logsumexp(logits, 0))
        if out0.requires_grad:
            batch = out1.detach().float().double()  # lightly's bank is a float32 buffer
            size = self.bank.shape[0]
            if self.ptr + batch.shape[0] >= size:
                self.bank[self.ptr :] = batch[: size - self.ptr]
                self.ptr = 0
            else:
                self.bank[self.ptr : self.ptr + batch.shape[0]] = batch
                self.ptr += batch.shape[0]
        return total / out0.shape[0]


def rows(seed: int, n: int = 5, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_bank_starts_as_lightlys_random_unit_rows():
    torch.manual_seed(3)
    loss = MoCoLoss(0.2, (11, 4))
    torch.manual_seed(3)
    assert torch.equal(loss.bank, F.normalize(torch.randn(11, 4), dim=-1))
    assert loss.bank_ptr.tolist() == [0] and "bank" in loss.state_dict() and "bank_ptr" in loss.state_dict()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_values_gradients_and_bank_equal_lightlys_over_steps_that_wrap_around(backend):
    loss = MoCoLoss(0.2, (12, 4), backend=backend)
    reference = LightlyMemoryBankNTXent(loss.bank, 0.2)
    # 5 + 5 fill 10 of 12; the third batch fills the last 2 and drops 3; then from 0 again.
    for step in range(5):
        out0, out1 = rows(2 * step).requires_grad_(), rows(2 * step + 1).requires_grad_()
        ref0, ref1 = out0.detach().clone().requires_grad_(), out1.detach().clone().requires_grad_()
        got, want = loss(out0, out1), reference(ref0, ref1)
        assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
        for mine, theirs in zip(torch.autograd.grad(got, (out0, out1)), torch.autograd.grad(want, (ref0, ref1))):
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)
        assert torch.equal(loss.bank.double(), reference.bank)
        assert int(loss.bank_ptr) == reference.ptr


def test_triton_interpreter_matches_the_reference_with_its_two_key_sets():
    skip_unless_triton_interpreter()
    backend_status.cache_clear()
    set_fp32_precision("ieee")
    try:
        torch.manual_seed(0)
        triton, reference = MoCoLoss(0.2, (16, 4), backend="triton"), MoCoLoss(0.2, (16, 4), backend="reference")
        reference.bank.copy_(triton.bank)
        for step in range(3):
            out0, out1 = rows(2 * step).float().requires_grad_(), rows(2 * step + 1).float().requires_grad_()
            got, want = triton(out0, out1), reference(out0, out1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for mine, theirs in zip(torch.autograd.grad(got, (out0, out1)), torch.autograd.grad(want, (out0, out1))):
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
            assert torch.equal(triton.bank, reference.bank)
    finally:
        set_fp32_precision("tf32")


def test_triton_interpreter_in_subprocess():
    rerun_under_triton_interpreter(__file__, "test_triton_interpreter_matches", passed=1)


def test_an_evaluation_leaves_the_bank_alone_and_update_overrides_the_rule():
    loss = MoCoLoss(0.5, (8, 4))
    bank = loss.bank.clone()
    with torch.no_grad():
        loss(rows(0), rows(1))
    loss(rows(0).requires_grad_(), rows(1), update=False)
    assert torch.equal(loss.bank, bank) and int(loss.bank_ptr) == 0
    loss(rows(0), rows(1), update=True)
    torch.testing.assert_close(loss.bank[:5].double(), F.normalize(rows(1), dim=1), rtol=0, atol=1e-7)
    assert int(loss.bank_ptr) == 5


def test_no_other_key_of_the_batch_is_a_negative():
    loss = MoCoLoss(0.2, (6, 4))
    q, k = rows(0), rows(1)
    alone = [loss(q[i : i + 1], k[i : i + 1], update=False) for i in range(len(q))]
    torch.testing.assert_close(loss(q, k, update=False), torch.stack(alone).mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", ["out0", "out1", "bank"])
def test_a_nan_anywhere_gives_a_nan_loss(where):
    loss = MoCoLoss(0.2, (6, 4))
    out0, out1 = rows(0), rows(1)
    {"out0": out0, "out1": out1, "bank": loss.bank}[where][2, 1] = float("nan")
    assert math.isnan(loss(out0, out1).item())


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: MoCoLoss(0.0, (8, 4)), "temperature must be a finite number"),
        (lambda: MoCoLoss(0.2, 8), "memory_bank_size must be \\(keys, dim\\)"),
        (lambda: MoCoLoss(0.2, (0, 4)), "memory_bank_size\\[0\\] must be an integer >= 1"),
        (lambda: MoCoLoss(0.2, (8, 2.5)), "memory_bank_size\\[1\\] must be an integer >= 1"),
        (lambda: MoCoLoss(0.2, (8, 4), gather="grad"), "gather must be one of 'detached', None"),
        (lambda: MoCoLoss(0.2, (8, 4))(rows(0, d=3), rows(1, d=3)), "out0 must have 4 columns"),
        (lambda: MoCoLoss(0.2, (8, 4))(rows(0), rows(1, n=3)), "out0 and out1 must have the same shape"),
        (lambda: MoCoLoss(0.2, (8, 4))(rows(0), rows(1), update="yes"), "update must be True or False"),
    ],
)
def test_bad_arguments_are_refused_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()
