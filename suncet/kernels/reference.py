"""The multi-positive contrastive operation in plain PyTorch: the oracle for the fused kernels.

It materialises the M x N similarity matrix, so it is only for checking and small sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from suncet.kernels.layout import Layout


def allowed_and_positive(
    row_keys: Tensor, col_keys: Tensor, row_groups: Tensor, col_groups: Tensor, self_offset: int
) -> tuple[Tensor, Tensor]:
    """Masks [M, N]: which columns each row may see, and which of those are its positives."""
    rows = torch.arange(row_keys.shape[0], device=row_keys.device)
    cols = torch.arange(col_keys.shape[0], device=row_keys.device)
    allowed = (row_groups[:, None] == col_groups[None, :]) & (cols[None, :] != rows[:, None] + self_offset)
    positive = allowed & (row_keys[:, None] == col_keys[None, :])
    return allowed, positive


def multi_positive_reference(q: Tensor, k: Tensor, layout: Layout, tau: float) -> tuple[Tensor, Tensor]:
    """Per-row ``LSE(allowed columns) - LSE(positive columns)`` of ``q k^T / tau``, [M, P].

    q [M, D] and k [N, D] are already L2-normalised. Returns the per-row losses (fp32, or fp64
    for fp64 inputs; 0 on rows without a positive) and the boolean valid flag of each row. A
    non-finite value in q makes its row's loss NaN, one in k every row's, valid or not.
    """
    accumulate = torch.promote_types(q.dtype, torch.float32)  # fp32 for bf16/fp16, fp64 stays fp64
    s = (q.to(accumulate) @ k.to(accumulate).T) / tau
    # A non-finite input must not vanish behind a mask or an invalid row: x * (x.detach() * 0)
    # is 0 with zero gradient where x is finite, and NaN (value and gradient) where it is not.
    poison = (q * (q.detach() * 0)).sum(1) + (k * (k.detach() * 0)).sum()
    losses, valids = [], []
    for p in range(layout.sets):
        allowed, positive = allowed_and_positive(
            layout.row_keys[:, p], layout.col_keys[:, p], layout.row_groups, layout.col_groups, layout.self_offset
        )
        valid = positive.any(dim=1)
        # Rows with no positive are zeroed before the LSEs so that their (unused) branch stays
        # finite: a row of -inf would turn the zero upstream gradient into NaN.
        keep = valid[:, None]
        lse_all = torch.logsumexp(torch.where(keep, s.masked_fill(~allowed, float("-inf")), 0.0), dim=1)
        lse_pos = torch.logsumexp(torch.where(keep, s.masked_fill(~positive, float("-inf")), 0.0), dim=1)
        losses.append(torch.where(valid, lse_all - lse_pos, 0.0) + poison)
        valids.append(valid)
    return torch.stack(losses, 1), torch.stack(valids, 1)
