"""One record per kernel backend: what it takes, whether it runs here, and its two entry points.

``resolve_backend`` (``auto`` included), ``suncet doctor`` and the custom ops read these records
and nothing else, so a backend's devices, dtypes and width limit are stated once, here.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Backend:
    """A kernel backend.

    ``devices``: device types whose tensors it takes; ``auto_devices``: those on which ``auto``
    may pick it (None: any; the records' order is ``auto``'s preference). ``dtypes`` (None: any) and
    ``max_dim`` (None: any D) bound its inputs. ``status()`` says whether it can run on this
    machine and why (not). ``forward``/``backward`` are the fused entry points behind the custom
    ops (None for the reference, which autograd differentiates); ``forward_mean``/
    ``backward_mean``, where present, also reduce the losses to their masked means inside the
    kernels (suncet/kernels/op.py, MultiPositiveMean).
    """

    name: str
    summary: str
    devices: tuple[str, ...] | None
    auto_devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...] | None
    max_dim: int | None
    status: Callable[[], tuple[bool, str]]
    forward: Callable | None = None
    backward: Callable | None = None
    forward_mean: Callable | None = None
    backward_mean: Callable | None = None

    def refuses(self, device: torch.device, dtype: torch.dtype | None, dim: int | None) -> str:
        """Why this backend cannot take [*, dim] tensors of ``dtype`` on ``device`` ('' when it can)."""
        if self.devices is not None and device.type not in self.devices:
            return f"it takes {' or '.join(d.upper() for d in self.devices)} tensors, not {device.type}"
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            names = ", ".join(str(t).removeprefix("torch.") for t in self.dtypes)
            return f"it does not take {dtype} (takes {names})"
        if dim is not None and self.max_dim is not None and dim > self.max_dim:
            return f"it takes D <= {self.max_dim}, got {dim}"
        return ""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not torch.cuda.is_available() and not triton_interpreting():
        return False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels in the slow CPU interpreter)"
    try:
        import triton

        from suncet.kernels import triton_launch
    except Exception as exc:  # a triton that cannot compile our kernels must not break the package
        return False, f"Triton kernels do not import: {type(exc).__name__}: {exc}"
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
        return True, f"Triton {triton.__version__} on {where}, fp32 dots as {triton_launch.fp32_precision()}"
    return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1) on CPU tensors: slow, for tests"


def _cpu_status() -> tuple[bool, str]:
    from suncet.kernels import cpu

    return cpu.status()


def _cuda_status() -> tuple[bool, str]:
    from suncet.kernels import cuda

    return cuda.status()


# The entry points import their module on first use: importing triton costs seconds, and a
# machine without it must still import suncet.
def _cpu_forward(*args):
    from suncet.kernels import cpu

    return cpu.forward(*args)


def _cpu_backward(*args):
    from suncet.kernels import cpu

    return cpu.backward(*args)


def _triton_forward(*args):
    from suncet.kernels import triton_launch

    return triton_launch.forward(*args)


def _triton_backward(*args):
    from suncet.kernels import triton_launch

    return triton_launch.backward(*args)


def _triton_forward_mean(*args):
    from suncet.kernels import triton_launch

    return triton_launch.forward_mean(*args)


def _triton_backward_mean(*args):
    from suncet.kernels import triton_launch

    return triton_launch.backward_mean(*args)


def _cuda_forward(*args):
    from suncet.kernels import cuda

    return cuda.forward(*args)


def _cuda_backward(*args):
    from suncet.kernels import cuda

    return cuda.backward(*args)


RECORDS: tuple[Backend, ...] = (
    Backend(
        name="cpu",
        summary="C++/OpenMP, csrc/contrastive_cpu.cpp",
        devices=("cpu",),
        auto_devices=("cpu",),
        dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
        max_dim=None,
        status=_cpu_status,
        forward=_cpu_forward,
        backward=_cpu_backward,
    ),
    Backend(
        name="triton",
        summary="Triton, suncet/kernels/triton_kernels.py",
        devices=("cuda", "cpu") if triton_interpreting() else ("cuda",),
        auto_devices=("cuda",),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        max_dim=256,  # the kernels hold a [rows, D] tile on chip
        status=_triton_status,
        forward=_triton_forward,
        backward=_triton_backward,
        forward_mean=_triton_forward_mean,
        backward_mean=_triton_backward_mean,
    ),
    Backend(
        name="cuda",
        summary="CUDA C++ (WMMA), csrc/contrastive_cuda.cu",
        devices=("cuda",),
        auto_devices=("cuda",),
        dtypes=(torch.bfloat16,),
        max_dim=256,  # shared-memory tiles sized for D <= 256
        status=_cuda_status,
        forward=_cuda_forward,
        backward=_cuda_backward,
    ),
    Backend(
        name="reference",
        summary="PyTorch, suncet/kernels/reference.py; materialises the N x N matrix (the oracle)",
        devices=None,
        auto_devices=None,
        dtypes=None,
        max_dim=None,
        status=lambda: (True, "PyTorch, any device; materialises the N x N matrix (the oracle)"),
    ),
)
BY_NAME: dict[str, Backend] = {record.name: record for record in RECORDS}
