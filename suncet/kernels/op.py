"""The fused operation's one autograd Function, and the custom ops a tracer sees.

``FusedContrastive`` joins a backend's entry points (suncet/kernels/backends.py, ``Kernels``):
with ``means`` False it returns the per-row (loss [M, P], valid [M, P]); with ``means`` True the
masked mean of each segment of rows ([P], a scalar with one key set) that the backend's kernels
reduce themselves. Either
way its forward saves the operands and the backend's statistics with ``save_for_backward`` and
keeps the layout, tau and backend on ``ctx``, and its backward hands them back to the backend.
Every output is a tensor of its own, never a view: callers may modify a loss in place.

Eager calls go from the Function straight to the backend's module. Where a tracer must see the
operation (torch.compile, FakeTensorMode, make_fx) the Function calls the same entry points
through torch custom ops instead (``suncet::multi_positive``, ``suncet::multi_positive_mean`` and
their backward ops), which have fake implementations, so ``torch.compile(fullgraph=True)``
traces a training step without a graph break and runs the same kernels, the fused means
included. The custom-op dispatch is what eager calls skip: it is a large share of a step's host
time (docs/kernels.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from suncet.kernels.backends import BY_NAME, Kernels, resolve_backend
from suncet.kernels.layout import Layout


def traced(q: Tensor) -> bool:
    """Whether the ops must be called so that a tracer sees them: torch.compile, or any
    dispatch mode (FakeTensorMode, make_fx), or tensors without data."""
    return torch.compiler.is_compiling() or q.is_meta or torch._C._len_torch_dispatch_stack() > 0


_KERNELS: dict[str, Kernels] = {}


def kernels_of(backend: str) -> Kernels:
    """The module implementing fused backend ``backend``, imported once."""
    module = _KERNELS.get(backend)
    if module is None:
        module = _KERNELS[backend] = BY_NAME[backend].kernels
    return module


# The traced path: the layout travels as its fields (Layout.fields), in this order.
_LAYOUT_SCHEMA = (
    "Tensor row_keys, Tensor col_keys, Tensor row_groups, Tensor col_groups, "
    "SymInt self_offset, bool one_tower, SymInt boundary"
)
_LIB = torch.library.Library("suncet", "FRAGMENT")
_LIB.define(
    f"multi_positive(Tensor q, Tensor k, {_LAYOUT_SCHEMA}, float tau, str backend) -> (Tensor, Tensor, Tensor[])"
)
_LIB.define(
    f"multi_positive_backward(Tensor grad, Tensor q, Tensor k, {_LAYOUT_SCHEMA}, float tau, str backend, "
    "Tensor[] stats) -> (Tensor, Tensor)"
)
_LIB.define(f"multi_positive_mean(Tensor q, Tensor k, {_LAYOUT_SCHEMA}, float tau, str backend) -> (Tensor[], Tensor)")
_LIB.define(
    f"multi_positive_mean_backward(Tensor[] grads, Tensor q, Tensor k, {_LAYOUT_SCHEMA}, float tau, str backend, "
    "Tensor stats) -> (Tensor, Tensor)"
)


def _no_gradient(q: Tensor, dk: Tensor | None) -> Tensor:
    # A custom op returns tensors: "no dk" (one tower) travels as an empty one.
    return q.new_empty((0, q.shape[1])) if dk is None else dk


def _fake_statistics(q: Tensor, layout: Layout, tau: float, backend: str, means: bool) -> list[Tensor]:
    shapes = kernels_of(backend).statistics(layout.rows, layout.sets, q.shape[1], tau, q.dtype, means)
    return [q.new_empty(shape, dtype=dtype) for shape, dtype in shapes]


@torch.library.impl(_LIB, "multi_positive", "CompositeExplicitAutograd")
def _multi_positive_op(q, k, *fields_tau_backend):
    *fields, tau, backend = fields_tau_backend
    loss, valid, *stats = kernels_of(backend).forward(q, k, Layout(*fields), tau)
    return loss, valid, stats


@torch.library.register_fake("suncet::multi_positive")
def _multi_positive_fake(q, k, *fields_tau_backend):
    *fields, tau, backend = fields_tau_backend
    layout = Layout(*fields)
    stats = _fake_statistics(q, layout, tau, backend, False)
    loss_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (
        q.new_empty((layout.rows, layout.sets), dtype=loss_dtype),
        q.new_empty((layout.rows, layout.sets), dtype=torch.bool),
        stats,
    )


@torch.library.impl(_LIB, "multi_positive_backward", "CompositeExplicitAutograd")
def _multi_positive_backward_op(grad, q, k, *rest):
    *fields, tau, backend, stats = rest
    dq, dk = kernels_of(backend).backward(grad, q, k, Layout(*fields), tau, *stats)
    return dq, _no_gradient(q, dk)


@torch.library.impl(_LIB, "multi_positive_mean", "CompositeExplicitAutograd")
def _multi_positive_mean_op(q, k, *fields_tau_backend):
    *fields, tau, backend = fields_tau_backend
    means, stats = kernels_of(backend).forward_mean(q, k, Layout(*fields), tau)
    return list(means), stats


@torch.library.register_fake("suncet::multi_positive_mean")
def _multi_positive_mean_fake(q, k, *fields_tau_backend):
    *fields, tau, backend = fields_tau_backend
    layout = Layout(*fields)
    (stats,) = _fake_statistics(q, layout, tau, backend, True)
    shape = () if layout.sets == 1 else (layout.sets,)
    return [q.new_empty(shape, dtype=torch.float32) for _ in range(layout.segments)], stats


@torch.library.impl(_LIB, "multi_positive_mean_backward", "CompositeExplicitAutograd")
def _multi_positive_mean_backward_op(grads, q, k, *rest):
    *fields, tau, backend, stats = rest
    dq, dk = kernels_of(backend).backward_mean(grads, q, k, Layout(*fields), tau, stats)
    return dq, _no_gradient(q, dk)


def _gradients_fake(grad, q, k, *rest):
    fields = rest[:7]
    return q.new_empty(q.shape), (q.new_empty((0, q.shape[1])) if fields[5] else k.new_empty(k.shape))


torch.library.register_fake("suncet::multi_positive_backward", _gradients_fake)
torch.library.register_fake("suncet::multi_positive_mean_backward", _gradients_fake)


class FusedContrastive(torch.autograd.Function):
    """The fused backends' losses, differentiable in q and k: ``apply(q, k, (layout, tau,
    backend, means))`` with ``k`` None for one tower (a Function that takes one tensor twice
    cannot be traced). ``means`` False: (loss [M, P], valid [M, P], not differentiable);
    True: the masked mean of each segment ([P], a scalar with one key set), for a backend whose
    record ``fuses_means``. The settings travel as one tuple: each argument of ``apply`` costs
    autograd host time, in the forward and again in the backward's returned Nones."""

    @staticmethod
    def forward(ctx, q, k, call):
        layout, tau, backend, means = call
        columns = q if k is None else k
        if traced(q):
            op = torch.ops.suncet.multi_positive_mean if means else torch.ops.suncet.multi_positive
            outputs = op(q, columns, *layout.fields(), tau, backend)
            # The ops return lists: the statistics, or the means.
            outputs = (tuple(outputs[0]), outputs[1]) if means else (outputs[0], outputs[1], *outputs[2])
        else:
            kernels = kernels_of(backend)
            outputs = (kernels.forward_mean if means else kernels.forward)(q, columns, layout, tau)
        ctx.call = call
        if means:
            segment_means, stats = outputs
            ctx.save_for_backward(q, k, stats)
            return segment_means
        ctx.save_for_backward(q, k, *outputs[2:])
        ctx.mark_non_differentiable(outputs[1])
        return outputs[0], outputs[1]

    @staticmethod
    def backward(ctx, *grads):
        q, k, *stats = ctx.saved_tensors
        columns = q if k is None else k
        layout, tau, backend, means = ctx.call
        upstream = grads if means else grads[0].contiguous()
        if traced(q):
            op = torch.ops.suncet.multi_positive_mean_backward if means else torch.ops.suncet.multi_positive_backward
            if means:
                dq, dk = op(list(upstream), q, columns, *layout.fields(), tau, backend, *stats)
            else:
                dq, dk = op(upstream, q, columns, *layout.fields(), tau, backend, stats)
        else:
            kernels = kernels_of(backend)
            dq, dk = (kernels.backward_mean if means else kernels.backward)(upstream, q, columns, layout, tau, *stats)
        return dq, (None if k is None else dk), None


def _checked(q: Tensor, k: Tensor | None, layout: Layout, backend: str) -> str:
    """The backend that runs ``q`` against ``k`` (None: one tower) in ``layout``; ValueError when they do not fit."""
    shape = q.shape
    columns = shape if k is None else k.shape
    if len(shape) != 2 or len(columns) != 2 or columns[1] != shape[1]:
        shapes = f"{tuple(shape)}" + ("" if k is None else f" and {tuple(columns)}")
        raise ValueError(f"q and k must be [rows, D] with the same D, got {shapes}")
    if k is not None and k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if layout.one_tower != (k is None) or layout.rows != shape[0] or layout.cols != columns[0]:
        raise ValueError(
            f"the layout ({layout.rows} rows, {layout.cols} columns, one_tower={layout.one_tower}) does not fit "
            f"q {tuple(shape)} and " + ("k = q" if k is None else f"k {tuple(columns)}")
        )
    return resolve_backend(backend, q.device, q.dtype, shape[1])


def multi_positive(
    q: Tensor, k: Tensor | None, layout: Layout, tau: float, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Per-row losses [M, P] (fp32; fp64 for fp64 inputs on the cpu backend) and valid flags
    [M, P], differentiable in q and k; ``k`` None when the columns are the rows (``layout.one_tower``).

    ``q`` and ``k`` must be L2-normalised rows (``suncet.losses`` normalises before calling):
    the triton backend relies on ``|q_i . k_j| <= 1`` for tau >= 0.03006 and takes every
    exponent relative to ``1 / tau`` (docs/kernels.md). Rows far from unit norm give it
    non-finite losses, or positives lost to underflow (rows then wrongly invalid). Per-row
    weights: multiply the returned losses; the upstream gradient carries them into the backward.

    Non-finite inputs (docs/kernels.md has the table): every backend returns a NaN loss for a
    row of q holding a NaN or an inf, valid or not, and a non-finite gradient; a row of k holding
    a NaN makes NaN the losses of every row that sees it (reference, cpu, cuda: of every row),
    and always those of one row tile.
    """
    name = _checked(q, k, layout, backend)
    if name == "reference":
        from suncet.kernels.reference import multi_positive_reference

        return multi_positive_reference(q, q if k is None else k, layout, tau)
    return FusedContrastive.apply(q, k, (layout, float(tau), name, False))


def multi_positive_mean(
    q: Tensor, k: Tensor | None, layout: Layout, tau: float, backend: str = "auto"
) -> tuple[Tensor, ...]:
    """Masked means of ``multi_positive``'s losses over the valid rows of each segment of
    ``layout`` ([0, boundary) and, with two segments, [boundary, M)): one tensor per segment,
    [P] or a scalar with one key set, each a tensor of its own. A segment without a valid row
    gives 0 with zero gradient; a non-finite loss, even an invalid row's, makes its segment's
    mean non-finite.

    Backends with fused means (triton) reduce inside the kernels: one forward launch plus a
    small finishing one, one backward launch with one tower, no PyTorch kernel in between; the
    others take the per-row losses and reduce them here.
    """
    name = _checked(q, k, layout, backend)
    if BY_NAME[name].fuses_means:
        return FusedContrastive.apply(q, k, (layout, float(tau), name, True))
    loss, valid = multi_positive(q, k, layout, tau, name)
    return segment_means(loss, valid, layout)


def segment_means(loss: Tensor, valid: Tensor, layout: Layout) -> tuple[Tensor, ...]:
    """The mean of the valid rows' losses [M, P] over each segment of ``layout``'s rows, as
    ``multi_positive_mean`` returns them; 0 with zero gradient for a segment without a valid row."""
    weighted = loss * valid
    bounds = (0, layout.boundary, layout.rows)[: layout.segments + 1]
    means = []
    for start, end in zip(bounds, bounds[1:]):
        mean = weighted[start:end].sum(0) / valid[start:end].sum(0).clamp(min=1)
        means.append(mean[0] if layout.sets == 1 else mean)
    return tuple(means)
