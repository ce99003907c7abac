"""torch.distributed for the engine: start-up under torchrun, reductions, and gathers.

Everything here is an identity in a single process, so the engine runs the same code on one
CPU, one GPU or many.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from suncet.errors import ConfigError

GATHER_MODES = ("grad", "detached")


_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process; distributed variables left over in a shell (no
    TORCHELASTIC_RUN_ID beside them) are refused at once instead of waiting for peers that never come."""
    present = [name for name in _TORCHRUN_VARIABLES if name in os.environ]
    if not present:
        return False
    if len(present) < len(_TORCHRUN_VARIABLES) or "TORCHELASTIC_RUN_ID" not in os.environ:
        raise ConfigError(
            f"environment variable{'s' if len(present) > 1 else ''} {', '.join(present)} set, but this process was not "
            "started by torchrun; unset them, or start the run with --nproc-per-node or torchrun"
        )
    values = {name: os.environ[name] for name in _TORCHRUN_VARIABLES}
    if not all(v.isdigit() for v in values.values()) or int(values["RANK"]) >= int(values["WORLD_SIZE"]):
        raise ConfigError(
            f"torchrun's RANK, WORLD_SIZE, LOCAL_RANK must be integers with RANK < WORLD_SIZE, got {values}"[:200]
        )
    return True


def world_size_from_environment() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here")
    return device


def init_from_environment(device_name: str) -> torch.device:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs) and return this
    rank's device; without torchrun, the device ``device_name`` asks for."""
    device = resolve_device(device_name)
    if not launched_by_torchrun() or dist.is_initialized():
        if dist.is_initialized() and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return device


def shutdown() -> None:
    """Leave the process group while the interpreter is still whole, once no collective is pending.

    Exiting without it can abort a finished run: gloo's worker thread may still hold the last
    collective's tensors when the interpreter finalises, and freeing them there raises SIGABRT
    ("terminate called without an active exception"; pytorch/pytorch#190489). DDP wrappers in
    reference cycles keep the group alive, hence the collection first.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _all_reduce(x: Tensor, op: dist.ReduceOp) -> Tensor:
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x, op=op)
    return x


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks, on a copy; no gradient."""
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: Tensor) -> Tensor:
    """Maximum over ranks, on a copy; no gradient."""
    return _all_reduce(x, dist.ReduceOp.MAX)


def all_gather_plain(x: Tensor) -> Tensor:
    """Every rank's ``x`` (equal shapes), concatenated in rank order, without gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_rows(x: Tensor, mode: str) -> Tensor:
    """Every rank's rows concatenated in rank order.

    ``grad``: the gather's backward sums each rank's gradient for these rows over all ranks,
    so the objective is the same at any world size. ``detached``: remote rows carry no
    gradient (the reference code's behaviour, for parity studies); local rows keep theirs.
    """
    if mode not in GATHER_MODES:
        raise ValueError(f"gather mode must be one of {GATHER_MODES}, got {mode!r}")
    if not is_distributed():
        return x
    if mode == "grad":
        return _GatherWithGradient.apply(x)
    parts = list(all_gather_plain(x.detach()).split(x.shape[0]))
    parts[rank()] = x
    return torch.cat(parts)


def all_gather_objects(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of its rows' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rows = x.shape[0]
        return all_gather_plain(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        # gloo has no reduce-scatter: reduce everything, keep this rank's rows.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[rank() * ctx.rows : (rank() + 1) * ctx.rows].clone()
