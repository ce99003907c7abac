"""Backends of the fused multi-positive contrastive operation, and the choice between them.

Every backend computes, for rows q [M, D] against columns k [N, D] (both L2-normalised),
``loss_i = LSE_{k allowed}(s_ik) - LSE_{k positive}(s_ik)`` with ``s = q k^T / tau``, where
column k is allowed for row i when their groups match and k is not row i's own column
(``i + self_offset``), and positive when it is allowed and the keys match.

A call's rows, columns, keys, groups and offset are one ``Layout`` (layout.py); the entry points
``multi_positive`` and ``multi_positive_mean`` and the autograd Function are in op.py.

Backends: ``cpu`` (C++/OpenMP, csrc/contrastive_cpu.cpp), ``triton`` (CUDA GPUs, or the CPU
interpreter under TRITON_INTERPRET=1), ``cuda`` (CUDA C++, bf16), ``reference`` (PyTorch,
materialises the M x N matrix; the oracle). The fused ones never store an M x N matrix and save
only O(M) statistics for the backward (backends.py says what each takes).
"""

from __future__ import annotations

from suncet.kernels.backends import BACKENDS, backend_status, resolve_backend
from suncet.kernels.layout import MAX_KEY_SETS, Layout
from suncet.kernels.op import FusedContrastive, multi_positive, multi_positive_mean, segment_means, traced

__all__ = [
    "BACKENDS",
    "MAX_KEY_SETS",
    "FusedContrastive",
    "Layout",
    "backend_status",
    "multi_positive",
    "multi_positive_mean",
    "resolve_backend",
    "segment_means",
    "set_fp32_precision",
    "traced",
]


def set_fp32_precision(mode: str) -> None:
    """How the triton backend feeds fp32 inputs to the tensor cores: "tf32" (default) or "ieee"."""
    from suncet.kernels import triton_launch

    triton_launch.set_fp32_precision(mode)
