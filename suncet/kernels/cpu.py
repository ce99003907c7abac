"""The C++ CPU backend (csrc/contrastive_cpu.cpp): tiled, OpenMP, vectorised exp2.

fp32, bf16 and fp16 inputs accumulate in fp32; fp64 inputs run the same tiled code in fp64
(statistics and losses then come back in fp64), which is what gradcheck exercises.
"""

from __future__ import annotations

import torch

try:
    from suncet import _C
except ImportError as exc:  # an unbuilt checkout: the reference backend still works
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""


def status() -> tuple[bool, str]:
    if _C is None:
        return False, f"suncet._C not importable ({_IMPORT_ERROR}); run pip install --no-build-isolation -e ."
    if not hasattr(_C, "multi_positive_forward_cpu"):
        return False, "suncet._C was built without the CPU kernels; rebuild the extension"
    info = _C.build_info()
    return True, f"C++ kernels, OpenMP x{torch.get_num_threads()} threads, {info.get('simd', '?')}"


def forward(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower):
    return tuple(
        _C.multi_positive_forward_cpu(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower)
    )


def backward(
    grad_loss, q, k, row_keys, col_keys, row_groups, col_groups, lse_all, lse_pos, self_offset, tau, one_tower
):
    return tuple(
        _C.multi_positive_backward_cpu(
            grad_loss, q, k, row_keys, col_keys, row_groups, col_groups, lse_all, lse_pos, self_offset, tau, one_tower
        )
    )
