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
import importlib.util
import os

import torch
from torch import Tensor

from suncet.errors import ConfigError
from suncet.kernels.op import MultiPositive
from suncet.kernels.reference import multi_positive_reference

BACKENDS = ("cpu", "triton", "cuda", "reference")
MAX_KEY_SETS = 2
MAX_GPU_DIM = 256  # the GPU kernels hold a [rows, D] tile on chip

_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16,),
}


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not torch.cuda.is_available() and not _triton_interpreting():
        return False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels in the slow CPU interpreter)"
    try:
        import triton

        from suncet.kernels import triton_kernels
    except Exception as exc:  # a triton that cannot compile our kernels must not break the package
        return False, f"Triton kernels do not import: {type(exc).__name__}: {exc}"
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
        return True, f"Triton {triton.__version__} on {where}, fp32 dots as {triton_kernels.fp32_precision()}"
    return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1) on CPU tensors: slow, for tests"


@functools.lru_cache(maxsize=1)
def backend_status() -> dict[str, tuple[bool, str]]:
    """For each backend: whether it can run on this machine, and why (not)."""
    from suncet.kernels import cpu, cuda

    return {
        "cpu": cpu.status(),
        "triton": _triton_status(),
        "cuda": cuda.status(),
        "reference": (True, "PyTorch, any device; materialises the N x N matrix (the oracle)"),
    }


def _takes(name: str, device: torch.device, dtype: torch.dtype | None, dim: int | None) -> str:
    """Why backend ``name`` cannot take [*, dim] tensors of ``dtype`` on ``device`` ('' when it can)."""
    if name == "reference":
        return ""
    if name == "cpu" and device.type != "cpu":
        return f"it takes CPU tensors, not {device.type}"
    if name == "cuda" and device.type != "cuda":
        return f"it takes CUDA tensors, not {device.type}"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton_interpreting()):
        return f"it takes CUDA tensors, not {device.type} (unless TRITON_INTERPRET=1)"
    if dtype is not None and dtype not in _DTYPES[name]:
        return f"it does not take {dtype} (takes {', '.join(str(t).removeprefix('torch.') for t in _DTYPES[name])})"
    if name in ("triton", "cuda") and dim is not None and dim > MAX_GPU_DIM:
        return f"it takes D <= {MAX_GPU_DIM}, got {dim}"
    return ""


def resolve_backend(
    name: str, device: torch.device | str, dtype: torch.dtype | None = None, dim: int | None = None
) -> str:
    """The backend that ``name`` (a backend or ``auto``) selects for tensors on ``device``.

    ``auto`` picks the best usable one: on CPU tensors ``cpu`` when the extension has the
    kernels, else ``reference``; on CUDA tensors ``triton``, else ``cuda``, else ``reference``
    (skipping any that does not take ``dtype`` or width ``dim``, when given). An explicit
    backend that cannot run raises ConfigError with the reason.
    """
    if name not in (*BACKENDS, "auto"):
        raise ConfigError(f"unknown kernel backend '{name}'; choose one of auto, {', '.join(BACKENDS)}")
    device = torch.device(device)
    status = backend_status()
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if status[candidate][0] and not _takes(candidate, device, dtype, dim):
                return candidate
        return "reference"
    usable, reason = status[name]
    if not usable:
        raise ConfigError(f"kernel backend '{name}' cannot run here: {reason}")
    why_not = _takes(name, device, dtype, dim)
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
