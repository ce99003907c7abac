"""The contrastive losses: NT-Xent, SuNCEt, both from one launch, and the general multi-positive
form, as ``torch.nn.Module`` objects that hold their settings, and as functions for one-off calls.

Every one reduces to the fused operation (suncet/kernels): per row, the LSE over the columns it
may see minus the LSE over its positives, on L2-normalised rows, in one ``Layout``. A module
builds the parts of its layout that depend only on the batch's shape once per shape and device
(view ids, groups) and puts each call's labels into them, so that a step goes from the module to
the kernels' launcher through the autograd Function alone (suncet/kernels/op.py).

Under torchrun, ``gather="grad"`` (the default) makes every denominator run over the rows of
all ranks, with gradients flowing back to the rank that owns each row, so the objective is the
global batch's whatever the world size; ``"detached"`` keeps other ranks' rows without gradient;
``None`` compares this rank's rows only. In one process all three are the same. Across ranks
the losses take the per-row operation and divide by the valid rows of every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.distributed import (
    GATHER_MODES,
    all_gather_plain,
    all_gather_rows,
    all_reduce_sum,
    is_distributed,
    rank,
    world_size,
)
from suncet.kernels import BACKENDS, Layout, multi_positive, multi_positive_mean, traced
from suncet.losses import checks


def _normalize(x: Tensor) -> Tensor:
    # Normalised in fp32 (fp64 for fp64) and handed to the kernels in the input's dtype (bf16 stays bf16).
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=1).to(x.dtype)


def _view_ids(rows: int, device: torch.device) -> Tensor:
    """Image ids of a [view1; view2] layout of ``rows`` = 2B rows: i and i + B share an id."""
    return torch.arange(rows, device=device) % (rows // 2)


def _gathered_view_ids(local_rows: int, total_rows: int, device: torch.device) -> Tensor:
    """Image ids of columns gathered from ranks that each hold a [view1; view2] block."""
    j = torch.arange(total_rows, device=device)
    half = local_rows // 2
    return (j // local_rows) * half + (j % local_rows) % half


def _two_views(out0: object, out1: object) -> None:
    checks.embeddings("out0", out0)
    checks.embeddings("out1", out1)
    if out0.shape != out1.shape:
        raise ValueError(f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")


class _ContrastiveLoss(nn.Module):
    """Settings shared by the contrastive losses, checked once here, and the layouts of the
    shapes they have seen."""

    def __init__(self, temperature: float, backend: str, gather: str | None):
        super().__init__()
        self.temperature = checks.temperature("temperature", temperature)
        self.backend = checks.choice("backend", backend, ("auto", *BACKENDS))
        self.gather = checks.choice("gather", gather, (*GATHER_MODES, None))
        self._cache: dict[tuple, object] = {}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}, gather={self.gather!r}"

    def _cached(self, key: tuple, like: Tensor, make):
        """What ``make`` builds for ``key`` (a shape and device: layouts, ids), made once; a tracer
        sees it made each time (no fake tensor may be kept)."""
        if traced(like):
            return make()
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def _across_ranks(self) -> bool:
        return self.gather is not None and is_distributed()

    def _gathered_means(
        self, z: Tensor, keys: Tensor, col_keys: Tensor, groups: Tensor | None = None, boundary: int | None = None
    ) -> Tensor:
        """[2, P] means of this rank's rows ``z`` (raw) against every rank's, divided by the
        valid rows of all ranks over the world size: the ranks' values then average, as DDP
        averages gradients, to the global batch's means."""
        zn = _normalize(z)
        rows = z.shape[0]
        columns = all_gather_rows(zn, self.gather)
        col_groups = None if groups is None else groups.repeat(columns.shape[0] // rows)
        layout = Layout.of(keys, col_keys, groups, col_groups, self_offset=rank() * rows, boundary=boundary)
        loss, valid = multi_positive(zn, columns, layout, self.temperature, self.backend)
        end = layout.boundary
        counts = torch.stack([valid[:end].sum(0), valid[end:].sum(0)]).float()
        counts = all_reduce_sum(counts) / world_size()
        weighted = loss * valid
        return torch.stack([weighted[:end].sum(0), weighted[end:].sum(0)]) / counts.clamp(min=1)


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
        _two_views(out0, out1)
        z = torch.cat([out0, out1])
        rows, device = z.shape[0], z.device
        if self._across_ranks():
            ids = _view_ids(rows, device) + rank() * (rows // 2)
            return self._gathered_means(z, ids, _gathered_view_ids(rows, rows * world_size(), device))[0, 0]
        layout = self._cached(("ntxent", rows, device), z, lambda: Layout.of(_view_ids(rows, device), one_tower=True))
        (mean,) = multi_positive_mean(_normalize(z), None, layout, self.temperature, self.backend)
        return mean


class SuNCEtLoss(_ContrastiveLoss):
    """SuNCEt (Assran et al. 2020), called as ``loss(embeddings, labels)``.

    Per row i: ``-log(sum_{same class} exp(s_ij) / sum_{j != i} exp(s_ij))`` with s the cosine
    similarity over ``temperature``; the mean over rows whose class appears in another row (a
    batch with none gives 0 with zero gradient). Labels are integers compared for equality (a
    negative one is a class like any other). On L2-normalised embeddings this is NCA:
    pytorch-metric-learning's ``NCALoss(softmax_scale=1 / (2 * t))`` gives the same value,
    since its squared distances are ``2 - 2 cos``.
    """

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", gather: str | None = "grad"):
        super().__init__(temperature, backend, gather)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        checks.embeddings("embeddings", embeddings)
        rows, device = embeddings.shape[0], embeddings.device
        labels = checks.class_labels("labels", labels, rows, device)
        if self._across_ranks():
            return self._gathered_means(embeddings, labels, all_gather_plain(labels))[0, 0]
        layout = self._cached(
            ("suncet", rows, device), embeddings, lambda: Layout.of(torch.zeros_like(labels), one_tower=True)
        ).with_keys(labels[:, None])
        (mean,) = multi_positive_mean(_normalize(embeddings), None, layout, self.temperature, self.backend)
        return mean


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
        _two_views(out0, out1)
        checks.embeddings("labeled", labeled, width=out0.shape[1])
        unlabeled, rows_l, device = 2 * out0.shape[0], labeled.shape[0], out0.device
        labels = checks.class_labels("labels", labels, rows_l, device)
        z = torch.cat([out0, out1, labeled])

        def make() -> tuple[Layout, Tensor]:
            ids = _view_ids(unlabeled, device)
            groups = torch.cat([torch.zeros_like(ids), torch.ones(rows_l, dtype=torch.long, device=device)])
            return Layout.of(torch.cat([ids, labels]), row_groups=groups, one_tower=True, boundary=unlabeled), ids

        layout, ids = self._cached(("ntxent+suncet", unlabeled, rows_l, device), z, make)
        if self._across_ranks():
            world = world_size()
            col_ids = _gathered_view_ids(unlabeled, world * unlabeled, device).view(world, unlabeled)
            col_keys = torch.cat([col_ids, all_gather_plain(labels).view(world, rows_l)], dim=1).flatten()
            keys = torch.cat([ids + rank() * (unlabeled // 2), labels])
            means = self._gathered_means(z, keys, col_keys, layout.row_groups, unlabeled)
            return means[0, 0], means[1, 0]
        keys = torch.cat([ids, labels])[:, None]
        ntxent, suncet = multi_positive_mean(
            _normalize(z), None, layout.with_keys(keys), self.temperature, self.backend
        )
        return ntxent, suncet


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
    rank's), as pytorch-metric-learning's ``ref_emb`` / ``ref_labels``; as there, passing
    ``labels`` itself as ``ref_labels`` leaves out each row's own column (so ``loss(z, y, z, y)``
    is ``loss(z, y)``).
    """

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", gather: str | None = "grad"):
        super().__init__(temperature, backend, gather)
        self._self_comparison = SuNCEtLoss(temperature, backend=backend, gather=gather)

    def forward(
        self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor | None = None, ref_labels: Tensor | None = None
    ) -> Tensor:
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError("ref_labels is given without ref_emb")
            return self._self_comparison(embeddings, labels)
        if ref_labels is None:
            raise ValueError("ref_emb is given without ref_labels")
        own_columns = ref_labels is labels
        if own_columns and ref_emb is embeddings:
            return self._self_comparison(embeddings, labels)
        checks.embeddings("embeddings", embeddings)
        checks.embeddings("ref_emb", ref_emb, width=embeddings.shape[1])
        device = embeddings.device
        labels = checks.class_labels("labels", labels, embeddings.shape[0], device)
        ref_labels = labels if own_columns else checks.class_labels("ref_labels", ref_labels, ref_emb.shape[0], device)
        if own_columns and ref_emb.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"ref_labels is labels, so ref_emb needs {embeddings.shape[0]} rows, got {ref_emb.shape[0]}"
            )
        columns, col_keys = ref_emb, ref_labels
        if self._across_ranks():
            columns, col_keys = all_gather_rows(ref_emb, self.gather), all_gather_plain(ref_labels)
        # Each row's own column (own_columns) is i + this rank's offset; otherwise an offset past
        # the last column, so that no column is any row's own.
        offset = rank() * embeddings.shape[0] if own_columns else columns.shape[0]
        layout = Layout.of(labels, col_keys, self_offset=offset)
        if not self._across_ranks():
            (mean,) = multi_positive_mean(
                _normalize(embeddings), _normalize(columns), layout, self.temperature, self.backend
            )
            return mean
        loss, valid = multi_positive(
            _normalize(embeddings), _normalize(columns), layout, self.temperature, self.backend
        )
        count = all_reduce_sum(valid.sum().float()) / world_size()
        return (loss * valid).sum() / count.clamp(min=1)


# ---------------------------------------------------------------------------------------------
# The same losses as functions, each backed by a module kept per setting.


_MODULES: dict[tuple, _ContrastiveLoss] = {}


def _module(kind: type, temperature: float, backend: str, gather: str | None) -> _ContrastiveLoss:
    key = (kind, temperature, backend, gather)
    module = _MODULES.get(key)
    if module is None:
        module = _MODULES[key] = kind(temperature, backend=backend, gather=gather)
    return module


def _split_views(z: Tensor) -> tuple[Tensor, Tensor]:
    checks.embeddings("z", z)
    if z.shape[0] % 2:
        raise ValueError(f"NT-Xent needs [view1; view2] rows, an even count; got {z.shape[0]}")
    half = z.shape[0] // 2
    return z[:half], z[half:]


def nt_xent(z: Tensor, tau: float = 0.1, *, backend: str = "auto", gather: str | None = None) -> Tensor:
    """``NTXentLoss(tau)`` of ``z = [view1; view2]`` (raw projections, 2B rows)."""
    return _module(NTXentLoss, checks.temperature("tau", tau), backend, gather)(*_split_views(z))


def suncet_loss(
    z: Tensor, labels: Tensor, tau: float = 0.1, *, backend: str = "auto", gather: str | None = None
) -> Tensor:
    """``SuNCEtLoss(tau)(z, labels)``."""
    return _module(SuNCEtLoss, checks.temperature("tau", tau), backend, gather)(z, labels)


def nt_xent_and_suncet(
    z_unlabeled: Tensor,
    z_labeled: Tensor,
    labels: Tensor,
    tau: float = 0.1,
    *,
    backend: str = "auto",
    gather: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``NTXentSuNCEtLoss(tau)`` of the unlabeled views ``[view1; view2]`` and the labeled rows."""
    out0, out1 = _split_views(z_unlabeled)
    return _module(NTXentSuNCEtLoss, checks.temperature("tau", tau), backend, gather)(out0, out1, z_labeled, labels)


def multi_positive_loss(
    embeddings: Tensor,
    labels: Tensor,
    tau: float = 0.1,
    *,
    ref: Tensor | None = None,
    ref_labels: Tensor | None = None,
    backend: str = "auto",
    gather: str | None = None,
) -> Tensor:
    """``MultiPositiveContrastiveLoss(tau)(embeddings, labels, ref, ref_labels)``."""
    loss = _module(MultiPositiveContrastiveLoss, checks.temperature("tau", tau), backend, gather)
    return loss(embeddings, labels, ref, ref_labels)


def contrastive_loss(
    q: Tensor,
    row_keys: Tensor,
    *,
    k: Tensor | None = None,
    col_keys: Tensor | None = None,
    row_groups: Tensor | None = None,
    col_groups: Tensor | None = None,
    self_offset: int = 0,
    tau: float = 0.1,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """General multi-positive contrastive loss, per row.

    Rows ``q`` [M, D] are compared with columns ``k`` [N, D] (``q`` itself when omitted),
    both raw and L2-normalised here. Row i sees column j when their groups are equal and j is
    not row i's own column ``i + self_offset``; a seen column is a positive when its key
    equals the row's key. Returns ``(loss [M] fp32, valid [M] bool)``:
    ``loss_i = LSE over seen columns - LSE over positives`` of ``q_i . k_j / tau``, 0 on rows
    with no positive (``valid`` False).
    """
    tau = checks.temperature("tau", tau)
    checks.embeddings("q", q)
    row_keys = checks.class_labels("row_keys", row_keys, q.shape[0], q.device)
    qn = _normalize(q)
    if k is None:
        layout = Layout.of(row_keys, col_keys, row_groups, col_groups, self_offset=self_offset, one_tower=True)
        loss, valid = multi_positive(qn, None, layout, tau, backend)
    else:
        checks.embeddings("k", k, width=q.shape[1])
        if col_keys is None:
            raise ValueError("col_keys is required when k is given")
        col_keys = checks.class_labels("col_keys", col_keys, k.shape[0], q.device)
        layout = Layout.of(row_keys, col_keys, row_groups, col_groups, self_offset=self_offset)
        loss, valid = multi_positive(qn, _normalize(k), layout, tau, backend)
    return loss[:, 0], valid[:, 0]
