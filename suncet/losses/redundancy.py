"""The redundancy-reduction losses: VICReg's variance-invariance-covariance terms and Barlow
Twins' cross-correlation to the identity, as ``torch.nn.Module`` objects that hold their settings.

Both compare two views' embeddings [B, D] (no normalisation of rows: the terms are statistics
over the batch). They compute in fp32 at least (fp64 stays fp64), autocast off: a bf16 product
would round the small off-diagonal correlations they drive to zero. Under torchrun, with
``gather="grad"`` (the default), the batch statistics run over the rows of every rank, and each
row's gradient returns to the rank that owns it (the all-gather's backward sums the ranks'
gradients of its rows): the loss, and with DDP's mean of gradients the step, are those of one
process holding the global batch. ``gather="detached"`` keeps other ranks' rows without
gradient; ``None`` uses this rank's rows only. In one process all three are the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.distributed import GATHER_MODES, all_gather_rows, is_distributed
from suncet.errors import shown
from suncet.losses import checks


def _weight(name: str, value: object) -> float:
    w = checks.real_number(name, value)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {shown(value)}")
    return w


def _two_views(z_a: object, z_b: object) -> tuple[Tensor, Tensor]:
    """Two embeddings of the same shape [B, D], B >= 2 (a batch statistic needs two rows), in fp32 at least."""
    z_a = checks.embeddings("z_a", z_a)
    z_b = checks.embeddings("z_b", z_b, width=z_a.shape[1])
    if z_a.shape[0] != z_b.shape[0]:
        raise ValueError(f"z_b must have the rows of z_a ({z_a.shape[0]}), got {z_b.shape[0]}")
    if z_a.shape[0] < 2:
        raise ValueError(f"z_a must have at least 2 rows (the terms are batch statistics), got {z_a.shape[0]}")
    dtype = torch.promote_types(torch.promote_types(z_a.dtype, z_b.dtype), torch.float32)
    return z_a.to(dtype), z_b.to(dtype)


def _off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class _GatheringLoss(nn.Module):
    def __init__(self, gather: str | None):
        super().__init__()
        self.gather = checks.choice("gather", gather, (*GATHER_MODES, None))

    def _gathered(self, z: Tensor) -> Tensor:
        if self.gather is None or not is_distributed():
            return z
        return all_gather_rows(z.contiguous(), self.gather)


class VICRegLoss(_GatheringLoss):
    """VICReg (Bardes et al. 2022), called as ``loss(z_a, z_b)`` on the two views' expander
    outputs [B, D]: ``lambda_param * invariance + mu_param * variance + nu_param * covariance``.

    - invariance: the mean squared difference of ``z_a`` and ``z_b`` (this rank's rows);
    - variance: the mean over dimensions of ``relu(1 - sqrt(var + eps))`` (unbiased variance over
      the batch), averaged over the two views;
    - covariance: the sum of the squared off-diagonal entries of each view's covariance matrix
      (unbiased), over D, summed over the two views.

    ``terms(z_a, z_b)`` returns the three unweighted terms for logging. Equals
    ``lightly.loss.VICRegLoss(lambda_param, mu_param, nu_param, gather_distributed=True, eps)``
    (with ``gather=None``: ``gather_distributed=False``), which is the authors' loss
    (facebookresearch/vicreg, main_vicreg.py, ``VICReg.forward``: ``sim_coeff``, ``std_coeff``,
    ``cov_coeff`` = 25, 25, 1, and the embeddings of every rank gathered for the variance and
    covariance terms by its ``FullGatherLayer``).
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        eps: float = 1e-4,
        *,
        gather: str | None = "grad",
    ):
        super().__init__(gather)
        self.lambda_param = _weight("lambda_param", lambda_param)
        self.mu_param = _weight("mu_param", mu_param)
        self.nu_param = _weight("nu_param", nu_param)
        self.eps = checks.real_number("eps", eps)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0 (it keeps sqrt's gradient finite), got {shown(eps)}")

    def extra_repr(self) -> str:
        return (
            f"lambda_param={self.lambda_param}, mu_param={self.mu_param}, nu_param={self.nu_param}, "
            f"eps={self.eps}, gather={self.gather!r}"
        )

    def terms(self, z_a: Tensor, z_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(invariance, variance, covariance), unweighted."""
        z_a, z_b = _two_views(z_a, z_b)
        with torch.autocast(z_a.device.type, enabled=False):
            return self._terms(z_a, z_b)

    def _terms(self, z_a: Tensor, z_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        invariance = F.mse_loss(z_a, z_b)
        z_a, z_b = self._gathered(z_a), self._gathered(z_b)
        variance = 0.5 * (self._variance(z_a) + self._variance(z_b))
        covariance = self._covariance(z_a) + self._covariance(z_b)
        return invariance, variance, covariance

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        invariance, variance, covariance = self.terms(z_a, z_b)
        return self.lambda_param * invariance + self.mu_param * variance + self.nu_param * covariance

    def _variance(self, z: Tensor) -> Tensor:
        return F.relu(1.0 - torch.sqrt(z.var(dim=0) + self.eps)).mean()

    @staticmethod
    def _covariance(z: Tensor) -> Tensor:
        z = z - z.mean(dim=0)
        cov = z.T @ z / (z.shape[0] - 1)
        return _off_diagonal(cov).pow(2).sum() / z.shape[1]


class BarlowTwinsLoss(_GatheringLoss):
    """Barlow Twins (Zbontar et al. 2021), called as ``loss(z_a, z_b)`` on the two views'
    projector outputs [B, D]: ``sum_i (1 - c_ii)^2 + lambda_param * sum_{i != j} c_ij^2``.

    ``c`` is the cross-correlation of the views standardised over the batch as ``F.batch_norm``
    in training mode does it: ``(z - mean) / sqrt(var + 1e-5)``, with the biased variance, then
    ``c = z_a_n.T @ z_b_n / B``. ``terms(z_a, z_b)`` returns (on-diagonal, off-diagonal), the
    latter unweighted. Equals ``lightly.loss.BarlowTwinsLoss(lambda_param)`` in one process
    (lightly's default 5e-3; the authors' ``--lambd`` is 0.0051). Under torchrun (``gather="grad"``)
    the statistics and ``c`` run over the global batch, as the authors' code does with SyncBatchNorm
    and an all-reduced ``c`` (facebookresearch/barlowtwins, main.py); lightly's
    ``gather_distributed=True`` instead standardises each rank's rows by that rank's statistics
    and averages the ranks' ``c``.
    """

    BN_EPS = 1e-5  # nn.BatchNorm1d's, which the authors' code and lightly's F.batch_norm use

    def __init__(self, lambda_param: float = 5e-3, *, gather: str | None = "grad"):
        super().__init__(gather)
        self.lambda_param = _weight("lambda_param", lambda_param)

    def extra_repr(self) -> str:
        return f"lambda_param={self.lambda_param}, gather={self.gather!r}"

    def terms(self, z_a: Tensor, z_b: Tensor) -> tuple[Tensor, Tensor]:
        """(on-diagonal, off-diagonal), unweighted."""
        z_a, z_b = _two_views(z_a, z_b)
        with torch.autocast(z_a.device.type, enabled=False):
            return self._terms(z_a, z_b)

    def _terms(self, z_a: Tensor, z_b: Tensor) -> tuple[Tensor, Tensor]:
        z_a, z_b = self._standardised(self._gathered(z_a)), self._standardised(self._gathered(z_b))
        c = z_a.T @ z_b / z_a.shape[0]
        return (torch.diagonal(c) - 1).pow(2).sum(), _off_diagonal(c).pow(2).sum()

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        on_diagonal, off_diagonal = self.terms(z_a, z_b)
        return on_diagonal + self.lambda_param * off_diagonal

    def _standardised(self, z: Tensor) -> Tensor:
        mean = z.mean(dim=0)
        var = z.var(dim=0, unbiased=False)
        return (z - mean) / torch.sqrt(var + self.BN_EPS)
