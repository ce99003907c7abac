"""Backends of the fused multi-positive contrastive operation, and the choice between them.

Every backend computes, for rows q [M, D] against columns k [N, D] (both L2-normalised),
``loss_i = LSE_{k allowed}(s_ik) - LSE_{k positive}(s_ik)`` with ``s = q k^T / tau``, where
column k is allowed for row i when their groups match and k is not row i's own column
(``i + self_offset``), and positive when it is allowed and the keys match.

Backends: ``cpu`` (C++/OpenMP, csrc/contrastive_cpu.cpp), ``triton`` (CUDA GPUs, or the CPU
interpreter under TRITON_INTERPRET=1), ``cuda`` (CUDA C++, bf16), ``reference`` (PyTorch,
materialises the M x N matrix; the oracle). The fused ones never store an M x N matrix, save
only O(M) statistics for the backward, and are torch custom ops (suncet/kernels/op.py).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from suncet.errors import ConfigError
from suncet.kernels.backends import BY_NAME, RECORDS
from suncet.kernels.op import MultiPositive, MultiPositiveMean, traced
from suncet.kernels.reference import multi_positive_reference

BACKENDS = tuple(record.name for record in RECORDS)
MAX_KEY_SETS = 2


@functools.lru_cache(maxsize=1)
def backend_status() -> dict[str, tuple[bool, str]]:
    """For each backend: whether it can run on this machine, and why (not)."""
    return {record.name: record.status() for record in RECORDS}


def resolve_backend(
    name: str, device: torch.device | str, dtype: torch.dtype | None = None, dim: int | None = None
) -> str:
    """The backend that ``name`` (a backend or ``auto``) selects for tensors on ``device``.

    ``auto`` picks the first record (suncet/kernels/backends.py) that may be chosen on this
    device type, runs here and takes ``dtype`` and width ``dim`` (when given): ``cpu`` then
    ``reference`` on CPU tensors, ``triton``, ``cuda``, ``reference`` on CUDA tensors. An
    explicit backend that cannot run raises ConfigError with the reason.
    """
    device = torch.device(device)
    status = backend_status()
    if _RESOLVED.get("status") is not status:  # recomputed (cache cleared): decide afresh
        _RESOLVED.clear()
        _RESOLVED["status"] = status
    key = (name, device.type, dtype, dim)
    chosen = _RESOLVED.get(key)
    if chosen is None:
        chosen = _RESOLVED[key] = _resolve(name, device, dtype, dim, status)
    return chosen


_RESOLVED: dict = {}  # (name, device type, dtype, dim) -> backend, and the status they came from


def _resolve(name: str, device: torch.device, dtype, dim, status) -> str:
    if name not in (*BACKENDS, "auto"):
        raise ConfigError(f"unknown kernel backend '{name}'; choose one of auto, {', '.join(BACKENDS)}")
    if name == "auto":
        for record in RECORDS:
            if record.auto_devices is not None and device.type not in record.auto_devices:
                continue
            if status[record.name][0] and not record.refuses(device, dtype, dim):
                return record.name
        return "reference"
    usable, reason = status[name]
    if not usable:
        raise ConfigError(f"kernel backend '{name}' cannot run here: {reason}")
    why_not = BY_NAME[name].refuses(device, dtype, dim)
    if why_not:
        raise ConfigError(f"kernel backend '{name}' cannot run these inputs: {why_not}")
    return name


# torch.compile evaluates the choice once while tracing and keeps the answer, so a compiled step
# has no graph break here. This is what torch.compiler.assume_constant_result does; setting the
# mark directly spares every `import suncet` the 1.5 s import of torch._dynamo.
resolve_backend._dynamo_marked_constant = True


def set_fp32_precision(mode: str) -> None:
    """How the triton backend feeds fp32 inputs to the tensor cores: "tf32" (default) or "ieee"."""
    from suncet.kernels import triton_launch

    triton_launch.set_fp32_precision(mode)


def _key_sets(name: str, keys: Tensor, rows: int) -> Tensor:
    if keys.dim() not in (1, 2) or keys.shape[0] != rows:
        raise ValueError(f"{name} must be [{rows}] or [{rows}, P], got shape {tuple(keys.shape)}")
    if keys.dtype != torch.long or not keys.is_contiguous():
        keys = keys.to(torch.long).contiguous()
    return keys.unsqueeze(1) if keys.dim() == 1 else keys


def _groups(groups: Tensor, rows: int) -> Tensor:
    if groups.dim() != 1 or groups.shape[0] != rows:
        groups = groups.reshape(rows)
    if groups.dtype != torch.long or not groups.is_contiguous():
        groups = groups.to(torch.long).contiguous()
    return groups


def _prepare(q, k, row_keys, col_keys, row_groups, col_groups, backend):
    """Checked inputs of the op: (backend, single, row keys [M, P], column keys [N, P], row
    groups, column groups), the keys and groups as contiguous int64; tensors shared by rows and
    columns stay shared (the kernels then know the problem is symmetric)."""
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must be [rows, D] with the same D, got {tuple(q.shape)} and {tuple(k.shape)}")
    name = resolve_backend(backend, q.device, q.dtype, q.shape[1])
    rows, cols = q.shape[0], k.shape[0]
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    rk = _key_sets("row_keys", row_keys, rows)
    ck = rk if col_keys is row_keys else _key_sets("col_keys", col_keys, cols)
    if rk.shape[1] != ck.shape[1] or rk.shape[1] > MAX_KEY_SETS:
        raise ValueError(f"row and column keys must have the same number (<= {MAX_KEY_SETS}) of key sets")
    rg = _groups(row_groups, rows)
    cg = rg if col_groups is row_groups else _groups(col_groups, cols)
    return name, row_keys.dim() == 1, rk, ck, rg, cg


def multi_positive(
    q: Tensor,
    k: Tensor,
    row_keys: Tensor,
    col_keys: Tensor,
    row_groups: Tensor,
    col_groups: Tensor,
    self_offset: int,
    tau: float,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-row losses and valid flags; differentiable in q and k.

    ``q`` and ``k`` must be L2-normalised rows (``suncet.losses`` normalises before calling):
    the triton backend relies on ``|q_i . k_j| <= 1`` for tau >= 0.03006 and takes every
    exponent relative to ``1 / tau`` (docs/kernels.md). Rows far from unit norm give it
    non-finite losses, or positives lost to underflow (rows then wrongly invalid).
    Keys are [M] / [N], or [M, P] / [N, P] for P <= 2 positive-key sets sharing one
    denominator (e.g. NT-Xent's image ids and SuNCEt's classes on the same rows: one pass for
    both); the outputs are then [M] or [M, P]. Losses are fp32 (fp64 for fp64 inputs on the
    cpu backend). Per-row weights: multiply the returned losses; the upstream gradient of each
    row then carries its weight into the backward. When ``k is q`` the fused backends use the
    one-tower backward (one pass, no atomics).

    Non-finite inputs (docs/kernels.md has the table): every backend returns a NaN loss for a
    row of q holding a NaN or an inf, valid or not, and a non-finite gradient; a row of k holding
    a NaN makes NaN the losses of every row that sees it (reference, cpu, cuda: of every row),
    and always those of one row tile. An infinite coordinate is not a unit row: the losses
    normalise first, which turns it into NaN.
    """
    name, single, rk, ck, rg, cg = _prepare(q, k, row_keys, col_keys, row_groups, col_groups, backend)
    if name == "reference":
        outs = [
            multi_positive_reference(q, k, rk[:, p], ck[:, p], rg, cg, self_offset, tau) for p in range(rk.shape[1])
        ]
        loss, valid = torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs], 1)
    else:
        one_tower = k is q
        loss, valid = MultiPositive.apply(
            q, None if one_tower else k, rk, None if ck is rk else ck, rg, None if cg is rg else cg,
            int(self_offset), float(tau), one_tower, name,
        )  # fmt: skip
    if single:
        return loss[:, 0], valid[:, 0]
    return loss, valid


def multi_positive_mean(
    q: Tensor,
    k: Tensor,
    row_keys: Tensor,
    col_keys: Tensor,
    row_groups: Tensor,
    col_groups: Tensor,
    self_offset: int,
    tau: float,
    boundary: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, ...]:
    """Masked means of ``multi_positive``'s losses: the mean over the valid rows of
    [0, boundary) and, when ``boundary`` is given, of [boundary, M); one output per segment,
    a scalar for 1-D keys, else [P]. A segment without a valid row gives 0 with zero gradient;
    a non-finite loss, even an invalid row's, makes its segment's mean non-finite.

    Backends with fused means (triton) reduce inside the kernels: one forward launch plus a
    small finishing one, one backward launch with one tower, no PyTorch kernel in between.
    """
    name, single, rk, ck, rg, cg = _prepare(q, k, row_keys, col_keys, row_groups, col_groups, backend)
    rows = q.shape[0]
    end = rows if boundary is None else int(boundary)
    if not 0 <= end <= rows:
        raise ValueError(f"boundary must be within [0, {rows}], got {boundary}")
    segments = 1 if boundary is None else 2
    if BY_NAME[name].forward_mean is not None and not traced(q):
        one_tower = k is q
        return MultiPositiveMean.apply(
            q, None if one_tower else k, rk, None if ck is rk else ck, rg, None if cg is rg else cg,
            int(self_offset), float(tau), one_tower, end, segments, single, name,
        )  # fmt: skip
    loss, valid = multi_positive(q, k, rk, ck, rg, cg, self_offset, tau, name)
    parts = [(loss, valid)] if boundary is None else [(loss[:end], valid[:end]), (loss[end:], valid[end:])]
    means = tuple((part * ok).sum(0) / ok.sum(0).clamp(min=1) for part, ok in parts)
    return tuple(m[0] for m in means) if single else means
