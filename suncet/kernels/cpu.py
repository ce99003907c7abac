"""The C++ CPU backend (csrc/contrastive_cpu.cpp): tiled, OpenMP, vectorised exp2.

fp32, bf16 and fp16 inputs accumulate in fp32; fp64 inputs run the same tiled code in fp64
(statistics and losses then come back in fp64), which is what gradcheck exercises.

The kernels are built once per instruction-set variant (``avx512``, ``avx2``, ``generic``) and
the best one this processor supports runs; ``SUNCET_CPU_VARIANT`` (read once, at the first
call) or ``set_variant`` forces another that it supports.
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
    try:
        running = _C.cpu_variant()
    except RuntimeError as exc:  # SUNCET_CPU_VARIANT names a variant this processor cannot run
        return False, str(exc).splitlines()[0]
    built = ", ".join(_C.cpu_variants(False))
    return True, f"C++ kernels, {running} variant (this build: {built}), OpenMP x{torch.get_num_threads()} threads"


def variant() -> str:
    """The instruction-set variant the kernels run."""
    return _C.cpu_variant()


def variants(supported_only: bool = True) -> list[str]:
    """The variants of this build, best first: those this processor runs, or all."""
    return list(_C.cpu_variants(supported_only))


def set_variant(name: str) -> None:
    """Run the kernels of variant ``name`` from now on; ValueError when this processor lacks its
    instructions or the build has no such variant."""
    try:
        _C.set_cpu_variant(name)
    except RuntimeError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None


def forward(q, k, layout, tau, *, entry="multi_positive_forward_cpu"):
    """(loss [M, P], valid [M, P], LSE over the allowed columns [M], LSE over each set's positives
    [M, P]) from the extension's ``entry`` (the CUDA backend passes its own)."""
    return tuple(getattr(_C, entry)(q, k, *_keys_and_groups(layout), layout.self_offset, tau, layout.one_tower))


def statistics(rows, sets, d, tau, dtype, means):
    """(shape, dtype) of the statistics ``forward`` returns: the LSEs over the allowed columns [M]
    and over each set's positives [M, P], fp32 (fp64 for fp64 inputs)."""
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    return [((rows,), stats), ((rows, sets), stats)]


def backward(grad_loss, q, k, layout, tau, lse_all, lse_pos, *, entry="multi_positive_backward_cpu"):
    dq, dk = getattr(_C, entry)(
        grad_loss, q, k, *_keys_and_groups(layout), lse_all, lse_pos, layout.self_offset, tau, layout.one_tower
    )
    return dq, (None if layout.one_tower else dk)


def _keys_and_groups(layout):
    return layout.row_keys, layout.col_keys, layout.row_groups, layout.col_groups
