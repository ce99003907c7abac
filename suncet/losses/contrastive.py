"""NT-Xent, SuNCEt and their common multi-positive form, over any kernel backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from suncet import kernels
from suncet.distributed import all_gather_plain, all_gather_rows, all_reduce_sum, is_distributed, rank, world_size
from suncet.kernels.op import traced

# Ids and groups that depend only on the batch layout, made once per (layout, device): a step
# then launches no kernel to rebuild them.
_LAYOUTS: dict[tuple, Tensor] = {}


def _layout(key: tuple, like: Tensor, make) -> Tensor:
    if traced(like):  # a tracer must see the tensor being made, and no fake tensor may be kept
        return make()
    value = _LAYOUTS.get(key)
    if value is None:
        value = _LAYOUTS[key] = make()
    return value


def _normalize(x: Tensor) -> Tensor:
    # Normalised in fp32 (fp64 for fp64) and handed to the kernels in the input's dtype (bf16 stays bf16).
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=1).to(x.dtype)


def _check_rows(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")


def _check_keys(name: str, keys: Tensor, rows: int) -> None:
    if keys.dim() != 1 or keys.shape[0] != rows:
        raise ValueError(f"{name} must be 1-D with {rows} entries, got shape {tuple(keys.shape)}")


def masked_mean(loss: Tensor, valid: Tensor, across_ranks: bool = False) -> Tensor:
    """Mean of the valid rows' losses; 0 (with zero gradient) when no row is valid.

    ``across_ranks``: divide by the valid rows of ALL ranks over the world size, so that the
    ranks' values average (as DDP averages gradients) to the mean over the global batch even
    when ranks hold different numbers of valid rows.
    """
    count = valid.sum()
    if across_ranks:
        count = all_reduce_sum(count.float()) / world_size()
    return (loss * valid).sum() / count.clamp(min=1)


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
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    _check_rows("q", q)
    _check_keys("row_keys", row_keys, q.shape[0])
    qn = _normalize(q)
    if k is None:
        kn = qn
        col_keys = row_keys if col_keys is None else col_keys
    else:
        _check_rows("k", k)
        if k.shape[1] != q.shape[1]:
            raise ValueError(f"q and k differ in width: {q.shape[1]} vs {k.shape[1]}")
        if col_keys is None:
            raise ValueError("col_keys is required when k is given")
        kn = _normalize(k)
    _check_keys("col_keys", col_keys, kn.shape[0])
    if row_groups is None:
        row_groups = torch.zeros_like(row_keys)
    if col_groups is None:
        col_groups = row_groups if k is None else torch.zeros_like(col_keys)
    _check_keys("row_groups", row_groups, q.shape[0])
    _check_keys("col_groups", col_groups, kn.shape[0])
    return kernels.multi_positive(
        qn, kn, row_keys, col_keys, row_groups, col_groups, int(self_offset), float(tau), backend
    )


def _view_ids(rows: int, like: Tensor) -> Tensor:
    """Image ids of a [view1; view2] layout of ``rows`` = 2B rows: i and i + B share an id."""
    if rows % 2:
        raise ValueError(f"NT-Xent needs [view1; view2] rows, an even count; got {rows}")
    return _layout(("view ids", rows, like.device), like, lambda: torch.arange(rows, device=like.device) % (rows // 2))


def _means(z: Tensor, keys: Tensor, groups: Tensor, tau: float, boundary: int | None, backend: str) -> tuple[Tensor, ...]:
    """Masked means of the one-tower losses of raw ``z`` (rows [0, boundary) and the others, or
    all rows), reduced inside the kernels where the backend can (kernels.multi_positive_mean)."""
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    _check_rows("z", z)
    _check_keys("keys", keys, z.shape[0])
    zn = _normalize(z)
    return kernels.multi_positive_mean(zn, zn, keys, keys, groups, groups, 0, float(tau), boundary, backend)


def _gathered_view_ids(local_rows: int, total_rows: int, device: torch.device) -> Tensor:
    """Image ids of columns gathered from ranks that each hold a [view1; view2] block."""
    j = torch.arange(total_rows, device=device)
    half = local_rows // 2
    return (j // local_rows) * half + (j % local_rows) % half


def _across_ranks(gather: str | None) -> bool:
    return gather is not None and is_distributed()


def nt_xent(z: Tensor, tau: float = 0.1, *, backend: str = "auto", gather: str | None = None) -> Tensor:
    """SimCLR's NT-Xent: mean over the 2B rows of ``z = [view1; view2]`` (raw projections).

    ``gather`` ('grad' or 'detached') makes the denominators run over every rank's rows under
    torch.distributed (see ``suncet.distributed.all_gather_rows``).
    """
    rows = z.shape[0]
    ids = _view_ids(rows, z)
    if not _across_ranks(gather):
        groups = _layout(("one group", rows, z.device), z, lambda: torch.zeros(rows, dtype=torch.long, device=z.device))
        return _means(z, ids, groups, tau, None, backend)[0]
    columns = all_gather_rows(z, gather)
    loss, valid = contrastive_loss(
        z, ids + rank() * (rows // 2), k=columns, col_keys=_gathered_view_ids(rows, columns.shape[0], z.device),
        self_offset=rank() * rows, tau=tau, backend=backend,
    )
    return masked_mean(loss, valid, across_ranks=True)


def suncet_loss(
    z: Tensor, labels: Tensor, tau: float = 0.1, *, backend: str = "auto", gather: str | None = None
) -> Tensor:
    """SuNCEt on labeled projections ``z`` [N, D]: positives (same class) summed inside the log.

    Rows whose class appears nowhere else are left out of the mean; with no such row at all
    the loss is 0 with zero gradient. ``gather`` as for ``nt_xent``.
    """
    labels = labels.to(device=z.device, dtype=torch.long)
    if not _across_ranks(gather):
        rows = z.shape[0]
        groups = _layout(("one group", rows, z.device), z, lambda: torch.zeros(rows, dtype=torch.long, device=z.device))
        return _means(z, labels, groups, tau, None, backend)[0]
    loss, valid = contrastive_loss(
        z, labels, k=all_gather_rows(z, gather), col_keys=all_gather_plain(labels),
        self_offset=rank() * z.shape[0], tau=tau, backend=backend,
    )
    return masked_mean(loss, valid, across_ranks=True)


def multi_positive_loss(
    embeddings: Tensor, labels: Tensor, tau: float = 0.1, *, ref: Tensor | None = None, ref_labels: Tensor | None = None,
    backend: str = "auto", gather: str | None = None,
) -> Tensor:
    """Mean, over the rows of ``embeddings`` that have a positive, of the multi-positive loss:
    positives (equal labels) summed inside the log. Without ``ref`` the rows are compared with
    each other (``suncet_loss``); with ``ref`` [N, D] and ``ref_labels`` [N] with those rows, under
    torchrun with every rank's (``gather`` as for ``nt_xent``).
    """
    if ref is None:
        if ref_labels is not None:
            raise ValueError("ref_labels is given without ref_emb")
        return suncet_loss(embeddings, labels, tau, backend=backend, gather=gather)
    if ref_labels is None:
        raise ValueError("ref_emb is given without ref_labels")
    device = embeddings.device
    labels = labels.to(device=device, dtype=torch.long)
    ref_labels = ref_labels.to(device=device, dtype=torch.long)
    across = _across_ranks(gather)
    columns, col_keys = (all_gather_rows(ref, gather), all_gather_plain(ref_labels)) if across else (ref, ref_labels)
    # An offset past the last column: no reference row is any row's own.
    loss, valid = contrastive_loss(
        embeddings, labels, k=columns, col_keys=col_keys, self_offset=columns.shape[0], tau=tau, backend=backend
    )
    return masked_mean(loss, valid, across_ranks=across)


def nt_xent_and_suncet(
    z_unlabeled: Tensor, z_labeled: Tensor, labels: Tensor, tau: float = 0.1, *, backend: str = "auto",
    gather: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Both terms from ONE launch over ``[z_unlabeled; z_labeled]``.

    The unlabeled rows ([view1; view2]) only see unlabeled columns and the labeled rows only
    labeled columns, so the result equals ``nt_xent(z_unlabeled)`` and
    ``suncet_loss(z_labeled, labels)``; ``gather`` as for ``nt_xent``.
    """
    rows_u, rows_l = z_unlabeled.shape[0], z_labeled.shape[0]
    device = z_unlabeled.device
    labels = labels.to(device=device, dtype=torch.long)
    z = torch.cat([z_unlabeled, z_labeled])
    groups = _layout(
        ("two groups", rows_u, rows_l, device), z,
        lambda: torch.cat([torch.zeros(rows_u, dtype=torch.long, device=device), torch.ones(rows_l, dtype=torch.long, device=device)]),
    )  # fmt: skip
    ids = _view_ids(rows_u, z)
    if not _across_ranks(gather):
        ntxent, suncet = _means(z, torch.cat([ids, labels]), groups, tau, rows_u, backend)
        return ntxent, suncet
    local = rows_u + rows_l
    columns = all_gather_rows(z, gather)
    world = columns.shape[0] // local
    col_ids = _gathered_view_ids(rows_u, world * rows_u, device).view(world, rows_u)
    col_keys = torch.cat([col_ids, all_gather_plain(labels).view(world, rows_l)], dim=1).flatten()
    loss, valid = contrastive_loss(
        z, torch.cat([ids + rank() * (rows_u // 2), labels]), k=columns, col_keys=col_keys,
        row_groups=groups, col_groups=groups.repeat(world), self_offset=rank() * local, tau=tau, backend=backend,
    )  # fmt: skip
    return (
        masked_mean(loss[:rows_u], valid[:rows_u], across_ranks=True),
        masked_mean(loss[rows_u:], valid[rows_u:], across_ranks=True),
    )
