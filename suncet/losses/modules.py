"""The losses as ``torch.nn.Module`` objects that hold their settings, for any training loop.

Each module is built once with its settings, checked then (suncet/losses/checks.py), and is
called like the peer library's loss it replaces (the docstrings name the peer and the settings
under which the values are equal; docs/losses.md shows the swap). The contrastive ones live in
``suncet.losses.contrastive``; SwAV's here, with the run's set of contrastive losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from suncet.losses import checks
from suncet.losses.contrastive import MultiPositiveContrastiveLoss, NTXentLoss, NTXentSuNCEtLoss, SuNCEtLoss
from suncet.losses.swav import sinkhorn, swapped_prediction_loss

__all__ = [
    "ContrastiveLosses",
    "MultiPositiveContrastiveLoss",
    "NTXentLoss",
    "NTXentSuNCEtLoss",
    "SuNCEtLoss",
    "SwAVLoss",
]


class SwAVLoss(nn.Module):
    """SwAV's swapped prediction (Caron et al. 2020), called as
    ``loss(high_resolution_outputs, low_resolution_outputs, queue_outputs)``.

    Each output is a crop's prototype scores [B, K] (normalised embeddings times normalised
    prototypes). The codes of every high-resolution crop come from Sinkhorn-Knopp (no gradient;
    with ``queue_outputs[i]``, the queued scores of that crop join the assignment), and each is
    predicted from every other crop by a softmax at ``temperature``; the mean over those pairs.
    Equals ``lightly.loss.SwaVLoss(temperature, sinkhorn_iterations, sinkhorn_epsilon)``; under
    torchrun the Sinkhorn sums always run over every rank's samples (lightly's
    ``sinkhorn_gather_distributed=True``).
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05):
        super().__init__()
        self.temperature = checks.temperature("temperature", temperature)
        self.sinkhorn_iterations = checks.integer("sinkhorn_iterations", sinkhorn_iterations, 1)
        self.sinkhorn_epsilon = checks.temperature("sinkhorn_epsilon", sinkhorn_epsilon)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}, "
            f"sinkhorn_epsilon={self.sinkhorn_epsilon}"
        )

    def codes(self, scores: Tensor, queued: Tensor | None = None) -> Tensor:
        """The Sinkhorn codes of one crop's ``scores`` [B, K], assigned together with ``queued`` rows."""
        if queued is None:
            return sinkhorn(scores.detach(), self.sinkhorn_epsilon, self.sinkhorn_iterations)
        both = torch.cat([queued.detach(), scores.detach()])
        return sinkhorn(both, self.sinkhorn_epsilon, self.sinkhorn_iterations)[-scores.shape[0] :]

    def forward(
        self,
        high_resolution_outputs: Sequence[Tensor],
        low_resolution_outputs: Sequence[Tensor] = (),
        queue_outputs: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        high, low = list(high_resolution_outputs), list(low_resolution_outputs)
        for name, crops in (("high_resolution_outputs", high), ("low_resolution_outputs", low)):
            for i, scores in enumerate(crops):
                checks.scores(f"{name}[{i}]", scores)
        if not high or len(high) + len(low) < 2:
            raise ValueError(
                f"SwAV predicts each high-resolution crop's code from another crop: it needs at least one "
                f"high-resolution crop and two crops in all, got {len(high)} and {len(low)}"
            )
        queued = list(queue_outputs) if queue_outputs is not None else [None] * len(high)
        if len(queued) != len(high):
            raise ValueError(
                f"queue_outputs must hold one entry per high-resolution crop ({len(high)}), got {len(queued)}"
            )
        codes = [self.codes(s, q) for s, q in zip(high, queued)]
        return swapped_prediction_loss(high + low, codes, self.temperature)


@dataclass(frozen=True)
class ContrastiveLosses:
    """The contrastive losses of one run, built once from its settings and handed to its method:
    no method passes a temperature, a backend or a gather mode per call."""

    ntxent: NTXentLoss
    suncet: SuNCEtLoss
    ntxent_suncet: NTXentSuNCEtLoss
    multi_positive: MultiPositiveContrastiveLoss

    @property
    def gather(self) -> str | None:
        """How the run sees other ranks' rows, for a loss a method builds from its own options."""
        return self.suncet.gather

    @classmethod
    def build(cls, temperature: float, backend: str = "auto", gather: str | None = "grad") -> ContrastiveLosses:
        settings = dict(backend=backend, gather=gather)
        return cls(
            NTXentLoss(temperature, **settings),
            SuNCEtLoss(temperature, **settings),
            NTXentSuNCEtLoss(temperature, **settings),
            MultiPositiveContrastiveLoss(temperature, **settings),
        )
