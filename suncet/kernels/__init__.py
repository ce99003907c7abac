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
from suncet.kernels.op import MultiPositive
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
    if name not in (*BACKENDS, "auto"):
        raise ConfigError(f"unknown kernel backend '{name}'; choose one of auto, {', '.join(BACKENDS)}")
    device = torch.device(device)
    status = backend_status()
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
    from suncet.kernels import triton_kernels

    triton_kernels.set_fp32_precision(mode)


def _key_sets(name: str, keys: Tensor, rows: int) -> Tensor:
    if keys.dim() not in (1, 2) or keys.shape[0] != rows:
        raise ValueError(f"{name} must be [{rows}] or [{rows}, P], got shape {tuple(keys.shape)}")
    return keys.reshape(rows, -1).to(torch.long).contiguous()


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
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must be [rows, D] with the same D, got {tuple(q.shape)} and {tuple(k.shape)}")
    name = resolve_backend(backend, q.device, q.dtype, q.shape[1])
    rows, cols = q.shape[0], k.shape[0]
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    single = row_keys.dim() == 1
    rk, ck = _key_sets("row_keys", row_keys, rows), _key_sets("col_keys", col_keys, cols)
    if rk.shape[1] != ck.shape[1] or rk.shape[1] > MAX_KEY_SETS:
        raise ValueError(f"row and column keys must have the same number (<= {MAX_KEY_SETS}) of key sets")
    rg, cg = row_groups.reshape(rows).to(torch.long).contiguous(), col_groups.reshape(cols).to(torch.long).contiguous()
    if name == "reference":
        outs = [
            multi_positive_reference(q, k, rk[:, p], ck[:, p], rg, cg, self_offset, tau) for p in range(rk.shape[1])
        ]
        loss, valid = torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs], 1)
    else:
        one_tower = k is q
        loss, valid = MultiPositive.apply(
            q, None if one_tower else k, rk, None if col_keys is row_keys else ck, rg,
            None if col_groups is row_groups else cg, int(self_offset), float(tau), one_tower, name,
        )  # fmt: skip
    if single:
        return loss[:, 0], valid[:, 0]
    return loss, valid
