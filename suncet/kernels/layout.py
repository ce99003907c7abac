"""How the rows of one call of the fused operation meet its columns: the ``Layout``.

Every backend, the autograd Function and the traced custom ops take one ``Layout`` instead of
loose keys, groups and offsets, so its fields are named here and nowhere else. A loss module
builds the parts that depend only on the batch's shape once (view ids, groups) and puts each
call's labels into them with ``with_keys``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

MAX_KEY_SETS = 2


def _key_sets(name: str, keys: Tensor, rows: int) -> Tensor:
    if keys.dim() not in (1, 2) or keys.shape[0] != rows:
        raise ValueError(f"{name} must be [{rows}] or [{rows}, P], got shape {tuple(keys.shape)}")
    if keys.dtype != torch.long or not keys.is_contiguous():
        keys = keys.to(torch.long).contiguous()
    keys = keys.unsqueeze(1) if keys.dim() == 1 else keys
    if keys.shape[1] > MAX_KEY_SETS:
        raise ValueError(f"{name} has {keys.shape[1]} key sets; at most {MAX_KEY_SETS} are supported")
    return keys


def _groups(name: str, groups: Tensor, rows: int) -> Tensor:
    if groups.dim() != 1 or groups.shape[0] != rows:
        raise ValueError(f"{name} must be [{rows}], got shape {tuple(groups.shape)}")
    if groups.dtype != torch.long or not groups.is_contiguous():
        groups = groups.to(torch.long).contiguous()
    return groups


@dataclass(frozen=True, eq=False)
class Layout:
    """Rows i of q [M, D] meet columns j of k [N, D]: column j is *allowed* for row i when
    ``row_groups[i] == col_groups[j]`` and ``j != i + self_offset``, and a *positive* of key set
    p when it is allowed and ``row_keys[i, p] == col_keys[j, p]`` (P <= 2 key sets share one
    denominator). ``one_tower``: k is q itself (one backward pass over ``(G + G^T) q``). Masked
    means run over the valid rows of two segments, ``[0, boundary)`` and ``[boundary, M)``
    (``boundary == M``: one segment).

    Keys are int64 ``[M, P]`` / ``[N, P]`` and groups int64 ``[M]`` / ``[N]``, contiguous; the
    column tensors are the row tensors themselves where rows and columns share them (kernels
    then know the problem is symmetric). Build one with ``Layout.of``.
    """

    row_keys: Tensor
    col_keys: Tensor
    row_groups: Tensor
    col_groups: Tensor
    self_offset: int
    one_tower: bool
    boundary: int
    # Derived once, for every launch to read: rows M, columns N, key sets P, whether rows and
    # columns share their keys and groups (one tower, the usual loss layout), mean segments.
    rows: int = field(init=False, repr=False)
    cols: int = field(init=False, repr=False)
    sets: int = field(init=False, repr=False)
    symmetric: bool = field(init=False, repr=False)
    segments: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rows, sets = self.row_keys.shape
        symmetric = self.one_tower and self.col_keys is self.row_keys and self.col_groups is self.row_groups
        for name, value in (
            ("rows", rows),
            ("cols", self.col_keys.shape[0]),
            ("sets", sets),
            ("symmetric", symmetric),
            ("segments", 1 if self.boundary >= rows else 2),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def of(
        cls,
        row_keys: Tensor,
        col_keys: Tensor | None = None,
        row_groups: Tensor | None = None,
        col_groups: Tensor | None = None,
        *,
        self_offset: int = 0,
        one_tower: bool = False,
        boundary: int | None = None,
    ) -> Layout:
        """A checked layout: keys [M] or [M, P] (a missing ``col_keys`` is ``row_keys``), groups
        [M] (missing: one group; missing ``col_groups``: ``row_groups`` when the columns are the
        rows, else one group)."""
        rows = row_keys.shape[0] if row_keys.dim() else -1
        rk = _key_sets("row_keys", row_keys, rows)
        ck = rk if col_keys is None or col_keys is row_keys else _key_sets("col_keys", col_keys, col_keys.shape[0])
        if ck.shape[1] != rk.shape[1]:
            raise ValueError(
                f"row_keys and col_keys must have the same number of key sets, got {rk.shape[1]} and {ck.shape[1]}"
            )
        if one_tower and ck.shape[0] != rows:
            raise ValueError(f"one tower: the columns are the {rows} rows, got {ck.shape[0]} column keys")
        rg = (
            torch.zeros(rows, dtype=torch.long, device=rk.device)
            if row_groups is None
            else _groups("row_groups", row_groups, rows)
        )
        if col_groups is None or col_groups is row_groups:
            same_rows = one_tower or ck is rk
            cg = rg if same_rows else torch.zeros(ck.shape[0], dtype=torch.long, device=rk.device)
        else:
            cg = _groups("col_groups", col_groups, ck.shape[0])
        end = rows if boundary is None else int(boundary)
        if not 0 <= end <= rows:
            raise ValueError(f"boundary must be within [0, {rows}], got {boundary}")
        return cls(rk, ck, rg, cg, int(self_offset), bool(one_tower), end)

    def with_keys(self, row_keys: Tensor, col_keys: Tensor | None = None) -> Layout:
        """This layout with other keys (a step's labels), int64 and contiguous like its own: row
        keys [M, P], and column keys [N, P] unless this layout's columns share the rows' keys."""
        if row_keys.shape != self.row_keys.shape:
            raise ValueError(f"row_keys must have shape {tuple(self.row_keys.shape)}, got {tuple(row_keys.shape)}")
        if self.col_keys is self.row_keys:
            col_keys = row_keys
        elif col_keys is None or col_keys.shape != self.col_keys.shape:
            raise ValueError(
                f"col_keys of shape {tuple(self.col_keys.shape)} are needed: this layout's columns have their own keys"
            )
        return Layout(
            row_keys, col_keys, self.row_groups, self.col_groups, self.self_offset, self.one_tower, self.boundary
        )

    def fields(self) -> tuple:
        """The given fields in declaration order, as the traced custom ops take them (``Layout(*fields)``)."""
        return tuple(getattr(self, given.name) for given in dataclasses.fields(self) if given.init)
