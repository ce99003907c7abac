"""SwAV's pieces: Sinkhorn-Knopp codes and the swapped-prediction loss (method.md section 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from suncet.distributed import all_reduce_max, all_reduce_sum, world_size


@torch.no_grad()
def sinkhorn(scores: Tensor, eps: float = 0.05, n_iters: int = 3) -> Tensor:
    """Equipartitioned soft assignments of B samples to K prototypes.

    ``scores`` [B, K] (cosine similarities) become codes [B, K] whose rows sum to 1 and whose
    prototype (column) sums approach B/K. Computed in float64 after subtracting the global
    maximum, so scores/eps of any size neither overflow nor underflow to an all-zero row.
    Under torch.distributed the sums run over every rank's samples (the global batch).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, prototypes], got shape {tuple(scores.shape)}")
    if not eps > 0 or n_iters < 1:
        raise ValueError(f"sinkhorn needs eps > 0 and n_iters >= 1, got eps={eps}, n_iters={n_iters}")
    logits = scores.double() / eps
    q = torch.exp(logits - all_reduce_max(logits.max())).T  # [K, B]
    batch = q.shape[1] * world_size()
    prototypes = q.shape[0]
    tiny = torch.finfo(torch.float64).tiny
    q /= all_reduce_sum(q.sum()).clamp(min=tiny)
    for _ in range(n_iters):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp(min=tiny)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True).clamp(min=tiny)
        q /= batch
    q *= batch
    return q.T.to(scores.dtype)


def swapped_prediction_loss(scores: list[Tensor], codes: list[Tensor], tau: float) -> Tensor:
    """Each assigned crop's code predicted from every other crop: mean of
    ``-sum_k q_ik log softmax(s_v / tau)_ik`` over samples, over (assigned, other) pairs."""
    accumulate = torch.promote_types(scores[0].dtype, torch.float32)
    log_probs = [F.log_softmax(s.to(accumulate) / tau, dim=1) for s in scores]
    total = scores[0].new_zeros((), dtype=accumulate)
    pairs = 0
    for assigned, q in enumerate(codes):
        for view, log_p in enumerate(log_probs):
            if view == assigned:
                continue
            total = total - (q.to(accumulate) * log_p).sum(dim=1).mean()
            pairs += 1
    return total / max(pairs, 1)
