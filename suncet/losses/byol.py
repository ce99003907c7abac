"""BYOL's regression loss as the negative cosine similarity of paired rows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.losses import checks


class NegativeCosineSimilarity(nn.Module):
    """The negative cosine similarity of paired rows, called as ``loss(x0, x1)`` on two [B, D]
    tensors: ``-mean_i cos(x0_i, x1_i)``, with ``cos = x . y / (max(|x|, eps) max(|y|, eps))``
    (``torch.nn.functional.cosine_similarity``).

    Equals ``lightly.loss.NegativeCosineSimilarity(dim=1, eps=eps)``. BYOL's regression loss of a
    prediction ``p`` and a target projection ``z`` is ``|p/|p| - z/|z||^2 = 2 - 2 cos(p, z)`` per
    row, so its mean over a batch is ``2 + 2 * loss(p, z)``; BYOL sums the two directions,
    ``4 + 2 * (loss(p0, z1) + loss(p1, z0))`` (the ``byol`` method's objective), which is
    ``4 + 4 *`` what lightly's BYOL example computes, ``0.5 * (loss(p0, z1) + loss(p1, z0))``:
    the same minimiser, with gradients four times as large. Inputs below fp32 are compared in
    fp32; a NaN in any row gives a NaN loss.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        value = checks.real_number("eps", eps)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.eps = value

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        checks.embeddings("x0", x0)
        checks.embeddings("x1", x1)
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        dtype = torch.promote_types(torch.promote_types(x0.dtype, x1.dtype), torch.float32)
        return -F.cosine_similarity(x0.to(dtype), x1.to(dtype), dim=1, eps=self.eps).mean()
