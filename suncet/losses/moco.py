"""MoCo's InfoNCE against a queue of keys (lightly's NT-Xent with a memory bank)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.distributed import all_gather_plain
from suncet.kernels import BACKENDS, Layout, multi_positive
from suncet.losses import checks


class MoCoLoss(nn.Module):
    """MoCo's contrastive loss, called as ``loss(out0, out1)`` on the queries [B, D] and their
    keys [B, D] (MoCo's key encoder gives them without gradient).

    Per row i: ``-log(exp(s_ii) / (exp(s_ii) + sum_j exp(q_i . m_j / t)))`` with ``s_ii =
    q_i . k_i / t`` on L2-normalised rows and ``m`` the memory bank's keys as they were before the
    call (never another row's key of the same batch); the mean over the B rows. After comparing,
    the normalised keys enter the bank (``update``: by default when ``out0`` requires a gradient,
    so an evaluation leaves the bank as it was): first-in first-out from a pointer, and a batch
    that reaches the end of the bank fills it up to the end, drops its other keys and puts the
    pointer back to 0. The bank starts as ``memory_bank_size = (K, D)`` random unit rows.

    Equals ``lightly.loss.NTXentLoss(temperature=t, memory_bank_size=(K, D), gather_distributed=True)``
    (lightly's MemoryBankModule), and MoCo's own loss (``moco/builder.py``) when K is a multiple of
    the global batch; ``gather=None`` is ``gather_distributed=False``. Under torchrun,
    ``gather="detached"`` puts every rank's keys, in rank order, into every rank's bank (as MoCo
    does), so the banks stay equal; each rank's value is the mean over its own rows, which DDP's
    gradient average makes the global batch's. The bank is a buffer: checkpoints carry it.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Sequence[int] = (65536, 128),
        *,
        backend: str = "auto",
        gather: str | None = "detached",
    ):
        super().__init__()
        self.temperature = checks.temperature("temperature", temperature)
        if not (isinstance(memory_bank_size, Sequence) and len(memory_bank_size) == 2):
            raise ValueError(f"memory_bank_size must be (keys, dim), got {memory_bank_size!r}")
        size = checks.integer("memory_bank_size[0]", memory_bank_size[0], 1)
        dim = checks.integer("memory_bank_size[1]", memory_bank_size[1], 1)
        self.backend = checks.choice("backend", backend, ("auto", *BACKENDS))
        self.gather = checks.choice("gather", gather, ("detached", None))
        self.register_buffer("bank", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long))

    def extra_repr(self) -> str:
        size, dim = self.bank.shape
        return f"temperature={self.temperature}, memory_bank_size=({size}, {dim}), backend={self.backend!r}, gather={self.gather!r}"

    def forward(self, out0: Tensor, out1: Tensor, update: bool | None = None) -> Tensor:
        checks.embeddings("out0", out0, width=self.bank.shape[1])
        checks.embeddings("out1", out1, width=self.bank.shape[1])
        if out0.shape != out1.shape:
            raise ValueError(f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
        if update is None:
            update = out0.requires_grad
        checks.flag("update", update)
        rows, device = out0.shape[0], out0.device
        dtype = torch.promote_types(out0.dtype, torch.float32)
        q = F.normalize(out0.to(dtype), dim=1)
        keys = F.normalize(out1.to(dtype), dim=1)
        bank = self.bank.detach().to(device=device, dtype=dtype)
        # One launch over the columns [keys; bank] with two key sets sharing its denominator:
        # set 0's positive is the row's own key, set 1's the whole bank, so the difference of
        # the two per-row losses is LSE_bank - s_ii, without the batch's other keys, and the
        # loss -log(e^s / (e^s + e^LSE_bank)) is its softplus.
        index = torch.arange(rows, device=device)
        row_keys = torch.stack([index, torch.full_like(index, -1)], dim=1)
        bank_keys = torch.full((bank.shape[0], 2), -1, dtype=torch.long, device=device)
        bank_keys[:, 0] = -2
        col_keys = torch.cat([torch.stack([index, torch.full_like(index, -3)], dim=1), bank_keys])
        layout = Layout.of(row_keys, col_keys, self_offset=rows + bank.shape[0])
        losses, _ = multi_positive(q, torch.cat([keys, bank]), layout, self.temperature, self.backend)
        loss = F.softplus(losses[:, 0] - losses[:, 1]).mean()
        if update:
            self._enqueue(keys.detach())
        return loss

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        if self.gather is not None:
            keys = all_gather_plain(keys.contiguous())
        size, ptr = self.bank.shape[0], int(self.bank_ptr)
        taken = keys[: size - ptr]
        self.bank[ptr : ptr + taken.shape[0]] = taken.to(self.bank.dtype)
        self.bank_ptr.fill_(0 if ptr + keys.shape[0] >= size else ptr + keys.shape[0])
