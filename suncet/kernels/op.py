"""The fused operation as torch custom ops, shared by the cpu, triton and cuda backends.

``suncet::multi_positive`` returns (loss [M, P], valid [M, P], stats_all [M], stats_pos [M, P]);
the backward (``suncet::multi_positive_backward``) needs nothing but the inputs and those
statistics (the LSEs; each backend reads its own). Both ops have fake implementations, so
``torch.compile`` traces a training step through them without a graph break.

``MultiPositive`` (a torch.autograd.Function) makes the losses differentiable. Where a tracer
must see the operation (torch.compile, FakeTensorMode, make_fx) it calls the two ops; in eager
mode it calls the backend directly, which spares the custom-op dispatch, a large share of a
step's host time (docs/kernels.md). With ``one_tower`` the caller passes the same tensor as q
and k; the backward then returns the whole gradient as dq (one atomics-free pass over
``(G + G^T) z``) and no gradient for k.

``MultiPositiveMean`` returns the masked means of the losses instead, for backends whose record
has ``forward_mean``: the kernels reduce them, so a forward and backward take two launches and
one (one tower), with no PyTorch kernel between them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from suncet.kernels.backends import BY_NAME


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower, backend):
    return BY_NAME[backend].forward(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower)


def _backward(
    grad_loss, q, k, row_keys, col_keys, row_groups, col_groups, lse_all, lse_pos, self_offset, tau, one_tower, backend
):
    return BY_NAME[backend].backward(
        grad_loss.contiguous(), q, k, row_keys, col_keys, row_groups, col_groups, lse_all, lse_pos, self_offset, tau,
        one_tower,
    )  # fmt: skip


@torch.library.custom_op("suncet::multi_positive", mutates_args=())
def multi_positive_op(
    q: Tensor,
    k: Tensor,
    row_keys: Tensor,
    col_keys: Tensor,
    row_groups: Tensor,
    col_groups: Tensor,
    self_offset: int,
    tau: float,
    one_tower: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower, backend)


@multi_positive_op.register_fake
def _multi_positive_fake(q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower, backend):
    rows, sets = row_keys.shape
    stats = _stats_dtype(q.dtype)
    return (
        q.new_empty((rows, sets), dtype=stats),
        q.new_empty((rows, sets), dtype=torch.bool),
        q.new_empty((rows,), dtype=stats),
        q.new_empty((rows, sets), dtype=stats),
    )


@torch.library.custom_op("suncet::multi_positive_backward", mutates_args=())
def multi_positive_backward_op(
    grad_loss: Tensor,
    q: Tensor,
    k: Tensor,
    row_keys: Tensor,
    col_keys: Tensor,
    row_groups: Tensor,
    col_groups: Tensor,
    lse_all: Tensor,
    lse_pos: Tensor,
    self_offset: int,
    tau: float,
    one_tower: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _backward(
        grad_loss, q, k, row_keys, col_keys, row_groups, col_groups, lse_all, lse_pos, self_offset, tau, one_tower, backend
    )


@multi_positive_backward_op.register_fake
def _multi_positive_backward_fake(
    grad_loss, q, k, row_keys, col_keys, row_groups, col_groups, lse_all, lse_pos, self_offset, tau, one_tower, backend
):
    dk = q.new_empty((0, q.shape[1])) if one_tower else k.new_empty(k.shape)
    return q.new_empty(q.shape), dk


def traced(q: Tensor) -> bool:
    """Whether the ops must be called so that a tracer sees them: torch.compile, or any
    dispatch mode (FakeTensorMode, make_fx), or tensors without data."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or q.is_meta


class MultiPositive(torch.autograd.Function):
    """(loss [M, P], valid [M, P]), differentiable in q and k (valid is not).

    ``k``, ``col_keys`` and ``col_groups`` are None where they are the row-side tensor (one
    tower): torch.compile cannot trace a Function that takes one tensor twice.
    """

    @staticmethod
    def forward(ctx, q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower, backend):
        k = q if k is None else k
        col_keys = row_keys if col_keys is None else col_keys
        col_groups = row_groups if col_groups is None else col_groups
        forward = multi_positive_op if traced(q) else _forward
        loss, valid, lse_all, lse_pos = forward(
            q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower, backend
        )
        ctx.mark_non_differentiable(valid)
        ctx.save_for_backward(q, k, row_keys, col_keys, row_groups, col_groups, lse_all, lse_pos)
        ctx.config = (self_offset, tau, one_tower, backend)
        return loss, valid

    @staticmethod
    def backward(ctx, grad_loss, _grad_valid):
        q, k, row_keys, col_keys, row_groups, col_groups, lse_all, lse_pos = ctx.saved_tensors
        self_offset, tau, one_tower, backend = ctx.config
        backward = multi_positive_backward_op if traced(q) else _backward
        dq, dk = backward(
            grad_loss, q, k, row_keys, col_keys, row_groups, col_groups, lse_all, lse_pos,
            self_offset, tau, one_tower, backend,
        )  # fmt: skip
        return dq, (None if one_tower else dk), None, None, None, None, None, None, None, None


class MultiPositiveMean(torch.autograd.Function):
    """Masked means of the losses, one output per segment of rows ([0, boundary) and, with two
    segments, [boundary, M)): [P], or a scalar with ``single`` (1-D keys). The backend's
    ``forward_mean`` returns the means and a state (its first item a tensor, saved for the
    backward; the rest kept as is) that its ``backward_mean`` takes back."""

    @staticmethod
    def forward(ctx, q, k, row_keys, col_keys, row_groups, col_groups, self_offset, tau, one_tower, boundary, segments,
                single, backend):  # fmt: skip
        means, state = BY_NAME[backend].forward_mean(
            q, q if k is None else k, row_keys, row_keys if col_keys is None else col_keys, row_groups,
            row_groups if col_groups is None else col_groups, self_offset, tau, one_tower, boundary,
        )  # fmt: skip
        ctx.save_for_backward(q, k, row_keys, col_keys, row_groups, col_groups, state[0])
        ctx.state = state[1:]
        ctx.config = (self_offset, one_tower, boundary, backend)
        ctx.set_materialize_grads(False)
        p = row_keys.shape[1]
        return (means if single else means.view(2, p)).unbind(0)[:segments]

    @staticmethod
    def backward(ctx, *grad_means):
        q, k, row_keys, col_keys, row_groups, col_groups, saved = ctx.saved_tensors
        self_offset, one_tower, boundary, backend = ctx.config
        dq, dk = BY_NAME[backend].backward_mean(
            grad_means, (saved, *ctx.state), q, q if k is None else k, row_keys,
            row_keys if col_keys is None else col_keys, row_groups, row_groups if col_groups is None else col_groups,
            self_offset, one_tower, boundary,
        )  # fmt: skip
        return dq, dk, *([None] * 11)
