"""The CUDA C++ backend (csrc/contrastive_cuda.cu): bf16 inputs, fp32 statistics.

Compiled only when the extension is built with CUDA (a GPU and nvcc present at build time, or
SUNCET_WITH_CUDA=ON). It is a hand-written tensor-core (WMMA) alternative to the Triton kernels.
"""

from __future__ import annotations

import torch

from suncet.kernels import cpu


def status() -> tuple[bool, str]:
    built, reason = cpu.status()
    if not built:
        return False, reason
    if not hasattr(cpu._C, "multi_positive_forward_cuda"):
        return False, "suncet._C was built without CUDA (needs nvcc and a GPU at build time, or SUNCET_WITH_CUDA=ON)"
    if not torch.cuda.is_available():
        return False, "built with CUDA, but no CUDA device is visible"
    return True, f"CUDA C++ WMMA kernels on {torch.cuda.get_device_name()}"


def forward(q, k, layout, tau):
    return tuple(
        cpu._C.multi_positive_forward_cuda(
            q,
            k,
            layout.row_keys,
            layout.col_keys,
            layout.row_groups,
            layout.col_groups,
            layout.self_offset,
            tau,
            layout.one_tower,
        )
    )


def statistics(rows, sets, d, tau, dtype, means):
    """(shape, dtype) of the statistics ``forward`` returns: the LSEs over the allowed columns [M]
    and over each set's positives [M, P], fp32 (fp64 for fp64 inputs)."""
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    return [((rows,), stats), ((rows, sets), stats)]


def backward(grad_loss, q, k, layout, tau, lse_all, lse_pos):
    dq, dk = cpu._C.multi_positive_backward_cuda(
        grad_loss,
        q,
        k,
        layout.row_keys,
        layout.col_keys,
        layout.row_groups,
        layout.col_groups,
        lse_all,
        lse_pos,
        layout.self_offset,
        tau,
        layout.one_tower,
    )
    return dq, (None if layout.one_tower else dk)
