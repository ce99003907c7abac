"""One record per kernel backend: what it takes, whether it runs here, and the module that
implements it.

``resolve_backend`` (``auto`` included), ``suncet doctor`` and the autograd Function read these
records and nothing else, so a backend's devices, dtypes and width limit are stated once, here.

A fused backend is one module implementing ``Kernels``: ``forward`` and ``backward`` of the
per-row losses, and, where the kernels reduce the masked means themselves, ``forward_mean`` and
``backward_mean``. Every entry point takes the operands and one ``Layout``
(suncet/kernels/layout.py); ``k`` is ``q`` itself with one tower.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from suncet.errors import ConfigError
from suncet.kernels.layout import Layout


class Kernels(Protocol):
    """The entry points of a fused backend's module.

    ``forward`` returns loss [M, P] (fp32, or fp64 where the backend keeps fp64 inputs in
    fp64), valid [M, P], then the statistics its ``backward`` reads, as many tensors as
    ``statistics`` describes (the custom ops' fake implementations build them from it).
    ``backward`` takes the upstream gradient [M, P] and those statistics and returns (dq, dk), dk
    None with one tower, where dq holds the whole gradient. Optional, where the kernels reduce
    the masked means themselves: ``forward_mean`` returns (the mean of each segment, [P] or a
    scalar with one key set; one statistics tensor) and ``backward_mean`` takes the means'
    upstream gradients, one per segment.
    """

    def forward(self, q: Tensor, k: Tensor, layout: Layout, tau: float) -> tuple[Tensor, ...]: ...

    def backward(
        self, grad_loss: Tensor, q: Tensor, k: Tensor, layout: Layout, tau: float, *stats: Tensor
    ) -> tuple[Tensor, Tensor | None]: ...

    def statistics(self, rows: int, sets: int, d: int, tau: float, dtype: torch.dtype, means: bool) -> list[tuple]: ...


@dataclass(frozen=True)
class Backend:
    """A kernel backend.

    ``devices``: device types whose tensors it takes; ``auto_devices``: those on which ``auto``
    may pick it (None: any; the records' order is ``auto``'s preference). ``dtypes`` (None: any) and
    ``max_dim`` (None: any D) bound its inputs. ``status()`` says whether it can run on this
    machine and why (not). ``module``: the module implementing ``Kernels`` (None for the
    reference, which autograd differentiates), imported on first use: importing triton costs
    seconds, and a machine without it must still import suncet. ``fuses_means``: the module
    also has ``forward_mean`` and ``backward_mean``.
    """

    name: str
    summary: str
    devices: tuple[str, ...] | None
    auto_devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...] | None
    max_dim: int | None
    status: Callable[[], tuple[bool, str]]
    module: str | None = None
    fuses_means: bool = False

    @property
    def kernels(self) -> Kernels:
        return importlib.import_module(self.module)

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


def _status_of(module: str) -> Callable[[], tuple[bool, str]]:
    return lambda: importlib.import_module(module).status()


RECORDS: tuple[Backend, ...] = (
    Backend(
        name="cpu",
        summary="C++/OpenMP, csrc/contrastive_cpu.cpp",
        devices=("cpu",),
        auto_devices=("cpu",),
        dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
        max_dim=None,
        status=_status_of("suncet.kernels.cpu"),
        module="suncet.kernels.cpu",
    ),
    Backend(
        name="triton",
        summary="Triton, suncet/kernels/triton_kernels.py",
        devices=("cuda", "cpu") if triton_interpreting() else ("cuda",),
        auto_devices=("cuda",),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        max_dim=256,  # the kernels hold a [rows, D] tile on chip
        status=_triton_status,
        module="suncet.kernels.triton_launch",
        fuses_means=True,
    ),
    Backend(
        name="cuda",
        summary="CUDA C++ (WMMA), csrc/contrastive_cuda.cu",
        devices=("cuda",),
        auto_devices=("cuda",),
        dtypes=(torch.bfloat16,),
        max_dim=256,  # shared-memory tiles sized for D <= 256
        status=_status_of("suncet.kernels.cuda"),
        module="suncet.kernels.cuda",
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
BACKENDS = tuple(record.name for record in RECORDS)


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
    status = backend_status()
    if _RESOLVED.get("status") is not status:  # recomputed (cache cleared): decide afresh
        _RESOLVED.clear()
        _RESOLVED["status"] = status
    key = (name, device, dtype, dim)
    chosen = _RESOLVED.get(key)
    if chosen is None:
        chosen = _RESOLVED[key] = _resolve(name, torch.device(device), dtype, dim, status)
    return chosen


_RESOLVED: dict = {}  # (name, device as given, dtype, dim) -> backend, and the status they came from


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
