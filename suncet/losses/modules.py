"""The losses as ``torch.nn.Module`` objects that hold their settings, for any training loop.

Each module is built once with its temperature, its kernel backend and how it sees other
ranks' rows, and is then called like the peer library's loss it replaces (the docstrings name
the peer and the settings under which the values are equal; docs/losses.md shows the swap).
The functional forms in ``suncet.losses.contrastive`` and ``suncet.losses.swav`` are the one
implementation underneath.

Under torchrun, ``gather="grad"`` (the default) makes every denominator run over the rows of
all ranks, with gradients flowing back to the rank that owns each row, so the objective is the
global batch's whatever the world size; ``"detached"`` keeps other ranks' rows without gradient;
``None`` compares this rank's rows only. In one process all three are the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from suncet.distributed import GATHER_MODES
from suncet.kernels import BACKENDS
from suncet.losses.contrastive import multi_positive_loss, nt_xent, nt_xent_and_suncet, suncet_loss
from suncet.losses.swav import sinkhorn, swapped_prediction_loss


def _checked_temperature(value: float, name: str = "temperature") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class _ContrastiveLoss(nn.Module):
    """Settings shared by the contrastive losses, checked once here."""

    def __init__(self, temperature: float, backend: str, gather: str | None):
        super().__init__()
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"unknown kernel backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
        if gather is not None and gather not in GATHER_MODES:
            raise ValueError(f"gather must be one of {', '.join(GATHER_MODES)} or None, got {gather!r}")
        self.temperature = _checked_temperature(temperature)
        self.backend = backend
        self.gather = gather

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}, gather={self.gather!r}"


class NTXentLoss(_ContrastiveLoss):
    """SimCLR's NT-Xent, called as ``loss(out0, out1)`` on the two views' projections [B, D].

    Each of the 2B rows is pulled towards its other view and pushed from the other 2B - 2 rows
    (its own row excluded), at cosine similarity over ``temperature``; the mean over the 2B rows.
    Equals ``lightly.loss.NTXentLoss(temperature=t, gather_distributed=True)`` (with
    ``gather=None``: ``gather_distributed=False``), and pytorch-metric-learning's
    ``NTXentLoss(temperature=t)`` on ``torch.cat([out0, out1])`` with labels
    ``torch.arange(B).repeat(2)``. The default temperature is lightly's.
    """

    def __init__(self, temperature: float = 0.5, *, backend: str = "auto", gather: str | None = "grad"):
        super().__init__(temperature, backend, gather)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if out0.shape != out1.shape:
            raise ValueError(f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
        return nt_xent(torch.cat([out0, out1]), self.temperature, backend=self.backend, gather=self.gather)


class SuNCEtLoss(_ContrastiveLoss):
    """SuNCEt (Assran et al. 2020), called as ``loss(embeddings, labels)``.

    Per row i: ``-log(sum_{same class} exp(s_ij) / sum_{j != i} exp(s_ij))`` with s the cosine
    similarity over ``temperature``; the mean over rows whose class appears in another row (a
    batch with none gives 0 with zero gradient). On L2-normalised embeddings this is NCA:
    pytorch-metric-learning's ``NCALoss(softmax_scale=1 / (2 * t))`` gives the same value,
    since its squared distances are ``2 - 2 cos``.
    """

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", gather: str | None = "grad"):
        super().__init__(temperature, backend, gather)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return suncet_loss(embeddings, labels, self.temperature, backend=self.backend, gather=self.gather)


class NTXentSuNCEtLoss(_ContrastiveLoss):
    """NT-Xent of the unlabeled views and SuNCEt of the labeled embeddings from one fused
    kernel launch, called as ``loss(out0, out1, labeled, labels) -> (ntxent, suncet)``.

    The two values equal ``NTXentLoss(t)(out0, out1)`` and ``SuNCEtLoss(t)(labeled, labels)``
    (the unlabeled rows never see the labeled ones, nor the reverse); weight and add them as
    the objective needs.
    """

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", gather: str | None = "grad"):
        super().__init__(temperature, backend, gather)

    def forward(self, out0: Tensor, out1: Tensor, labeled: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if out0.shape != out1.shape:
            raise ValueError(f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
        return nt_xent_and_suncet(
            torch.cat([out0, out1]), labeled, labels, self.temperature, backend=self.backend, gather=self.gather
        )


class MultiPositiveContrastiveLoss(_ContrastiveLoss):
    """The general multi-positive contrastive loss, called as ``loss(embeddings, labels)`` or
    ``loss(embeddings, labels, ref_emb, ref_labels)``.

    Every row with the same label is a positive, and the positives are summed INSIDE the log:
    per row ``-log(sum_{positives} exp(s_ij) / sum_{j} exp(s_ij))`` (the row itself excluded when
    comparing ``embeddings`` with themselves), the mean over rows that have a positive. This is
    the "L_in" form of Khosla et al.'s supervised contrastive loss; pytorch-metric-learning's
    ``SupConLoss`` is the "L_out" form (a mean of logs, one per positive), a different loss
    whenever a row has more than one positive. With one positive per row both are NT-Xent.
    With ``ref_emb``, rows are compared with those reference rows (under torchrun, every
    rank's), as pytorch-metric-learning's ``ref_emb`` / ``ref_labels``.
    """

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", gather: str | None = "grad"):
        super().__init__(temperature, backend, gather)

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor | None = None, ref_labels: Tensor | None = None
    ) -> Tensor:
        return multi_positive_loss(
            embeddings, labels, self.temperature, ref=ref_emb, ref_labels=ref_labels, backend=self.backend,
            gather=self.gather,
        )


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
        if isinstance(sinkhorn_iterations, bool) or not isinstance(sinkhorn_iterations, int) or sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be an integer >= 1, got {sinkhorn_iterations!r}")
        self.temperature = _checked_temperature(temperature)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.sinkhorn_epsilon = _checked_temperature(sinkhorn_epsilon, "sinkhorn_epsilon")

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}, "
                f"sinkhorn_epsilon={self.sinkhorn_epsilon}")

    def codes(self, scores: Tensor, queued: Tensor | None = None) -> Tensor:
        """The Sinkhorn codes of one crop's ``scores`` [B, K], assigned together with ``queued`` rows."""
        if queued is None:
            return sinkhorn(scores.detach(), self.sinkhorn_epsilon, self.sinkhorn_iterations)
        both = torch.cat([queued.detach(), scores.detach()])
        return sinkhorn(both, self.sinkhorn_epsilon, self.sinkhorn_iterations)[-scores.shape[0]:]

    def forward(
        self,
        high_resolution_outputs: Sequence[Tensor],
        low_resolution_outputs: Sequence[Tensor] = (),
        queue_outputs: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        high = list(high_resolution_outputs)
        queued = list(queue_outputs) if queue_outputs is not None else [None] * len(high)
        if len(queued) != len(high):
            raise ValueError(f"queue_outputs must hold one entry per high-resolution crop ({len(high)}), got {len(queued)}")
        codes = [self.codes(s, q) for s, q in zip(high, queued)]
        return swapped_prediction_loss(high + list(low_resolution_outputs), codes, self.temperature)


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
            NTXentLoss(temperature, **settings), SuNCEtLoss(temperature, **settings),
            NTXentSuNCEtLoss(temperature, **settings), MultiPositiveContrastiveLoss(temperature, **settings),
        )
