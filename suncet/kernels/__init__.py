"""Backends of the fused multi-positive contrastive operation, and the choice between them.

Every backend computes, for rows q [M, D] against columns k [N, D] (both L2-normalised),
``loss_i = LSE_{k allowed}(s_ik) - LSE_{k positive}(s_ik)`` with ``s = q k^T / tau``, where
column k is allowed for row i when their groups match and k is not row i's own column
(``i + self_offset``), and positive when it is allowed and the keys match.
"""

from __future__ import annotations

import torch
from torch import Tensor

from suncet.errors import ConfigError
from suncet.kernels.reference import multi_positive_reference

BACKENDS = ("cpu", "triton", "cuda", "reference")


def backend_status() -> dict[str, tuple[bool, str]]:
    """For each backend: whether it can run on this machine, and why not."""
    return {"reference": (True, "PyTorch, any device")}


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that ``name`` (a backend or ``auto``) selects for tensors on ``device``."""
    if name not in (*BACKENDS, "auto"):
        raise ConfigError(f"unknown kernel backend '{name}'; choose one of auto, {', '.join(BACKENDS)}")
    status = backend_status()
    if name == "auto":
        return "reference"
    usable, reason = status.get(name, (False, "not built"))
    if not usable:
        raise ConfigError(f"kernel backend '{name}' cannot run here: {reason}")
    return name


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
    """Per-row losses (fp32) and valid flags; differentiable in q and k."""
    resolve_backend(backend, q.device)
    return multi_positive_reference(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau)
