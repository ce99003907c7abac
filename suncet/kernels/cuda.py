"""The CUDA C++ backend (csrc/contrastive_cuda.cu): bf16 inputs, fp32 statistics.

Compiled only when the extension is built with CUDA (a GPU and nvcc present at build time, or
SUNCET_WITH_CUDA=ON). It is a hand-written tensor-core (WMMA) alternative to the Triton kernels.
"""

from __future__ import annotations

import functools

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


# The same entry points as the CPU backend's, on the extension's CUDA functions.
forward = functools.partial(cpu.forward, entry="multi_positive_forward_cuda")
statistics = cpu.statistics
backward = functools.partial(cpu.backward, entry="multi_positive_backward_cuda")
