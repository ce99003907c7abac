"""PAWS (Assran et al. 2021; method.md section 9): predicting view assignments with support samples.

Each view is classified by a soft nearest-neighbour classifier over a labeled support batch,
``softmax(norm(z) . norm(z_S)^T / tau) @ Y_S``, and trained to agree with the sharpened
prediction of the other large view; a me-max term keeps the average prediction spread over the
classes. The soft nearest-neighbour product is attention with the labels as values:
``soft_nearest_neighbours`` computes it as two GEMMs and a softmax, or through
``torch.nn.functional.scaled_dot_product_attention`` (docs/benchmarks.md measures both).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.distributed import GATHER_MODES, all_gather_plain, all_gather_rows, is_distributed, world_size
from suncet.losses import checks

SNN_METHODS = ("matmul", "attention")
# Widest value (class) dimension handed to one scaled_dot_product_attention call: its fused
# kernels take head dimensions up to 256, so wider label matrices go in chunks of classes.
ATTENTION_MAX_CLASSES = 256


def soft_nearest_neighbours(
    queries: Tensor, supports: Tensor, labels: Tensor, tau: float, method: str = "matmul"
) -> Tensor:
    """``softmax(norm(queries) . norm(supports)^T / tau) @ labels``: [A, D], [S, D], [S, C] -> [A, C].

    ``matmul``: the similarity GEMM, a softmax, the label GEMM. ``attention``: the same through
    ``scaled_dot_product_attention`` (queries, keys = supports, values = labels), in chunks of at
    most ``ATTENTION_MAX_CLASSES`` classes.
    """
    q, s = F.normalize(queries, dim=1), F.normalize(supports, dim=1)
    labels = labels.to(q.dtype)
    if method == "matmul":
        return torch.softmax(q @ s.T / tau, dim=1) @ labels
    if method != "attention":
        raise ValueError(f"soft nearest-neighbour method must be one of {', '.join(SNN_METHODS)}, got {method!r}")
    chunks = [
        F.scaled_dot_product_attention(
            q[None], s[None], labels[None, :, start : start + ATTENTION_MAX_CLASSES], scale=1 / tau
        )[0]
        for start in range(0, labels.shape[1], ATTENTION_MAX_CLASSES)
    ]
    return torch.cat(chunks, dim=1)


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """``p^(1/T)``, renormalised over the classes."""
    sharp = p ** (1.0 / temperature)
    return sharp / sharp.sum(dim=1, keepdim=True)


def smoothed_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot rows of ``labels`` with label smoothing: ``1 - s + s/C`` on the class, ``s/C`` elsewhere."""
    return F.one_hot(labels.long(), num_classes).float() * (1 - smoothing) + smoothing / num_classes


class _MeanAcrossRanks(torch.autograd.Function):
    """The mean of ``x`` over ranks. Every rank's loss holds the same mean, and DDP averages the
    ranks' gradients, so each rank passes its gradient on unscaled: the sum over ranks of the
    chain rule's 1 / W shares, times W, over W."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x / world_size()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class PAWSLoss(nn.Module):
    """PAWS's loss, called as the reference code calls it:
    ``loss(anchor_views, anchor_supports, anchor_support_labels, target_views, target_supports,
    target_support_labels) -> (cross_entropy, me_max)``.

    ``anchor_views`` [(2 + multicrop) B, D]: the two large views then the small ones;
    ``target_views`` [2 B, D]: the large views' targets, already swapped (view 1's target comes
    from view 2); the supports' labels are class indices [S] (one-hot with ``label_smoothing``)
    or rows [S, C] used as given. Targets are the sharpened (``sharpen_temperature``) soft
    nearest-neighbour predictions of the target views, no gradient, entries below 1e-4 set to 0;
    each small view's target is the mean of the two large views'. ``cross_entropy`` is the mean
    over anchors of ``H(target, p(anchor))``; ``me_max`` is ``sum(pbar log pbar)`` of the mean
    sharpened anchor prediction (0 with ``me_max=False``); the loss is their sum, in fp32 (fp64
    for fp64 inputs).

    Under torchrun (``gather="grad"``, the default) the supports of every rank take part, with
    gradients flowing back to their ranks, and ``pbar`` is the mean over every rank's anchors.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sharpen_temperature: float = 0.25,
        multicrop: int = 6,
        me_max: bool = True,
        label_smoothing: float = 0.1,
        num_classes: int | None = None,
        gather: str | None = "grad",
        snn: str = "matmul",
    ):
        super().__init__()
        self.temperature = checks.temperature("temperature", temperature)
        self.sharpen_temperature = checks.temperature("sharpen_temperature", sharpen_temperature)
        self.multicrop = checks.integer("multicrop", multicrop, 0)
        self.me_max = checks.flag("me_max", me_max)
        self.label_smoothing = checks.fraction("label_smoothing", label_smoothing)
        self.num_classes = None if num_classes is None else checks.integer("num_classes", num_classes, 1)
        self.gather = checks.choice("gather", gather, (*GATHER_MODES, None))
        self.snn = checks.choice("snn", snn, SNN_METHODS)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, sharpen_temperature={self.sharpen_temperature}, "
            f"multicrop={self.multicrop}, me_max={self.me_max}, label_smoothing={self.label_smoothing}"
        )

    def support_rows(self, labels: Tensor, name: str = "support labels", rows: int | None = None) -> Tensor:
        """The supports' label rows [S, C] (``rows`` = S where known): smoothed one-hot rows of
        class indices in [0, num_classes), or label rows as given."""
        if isinstance(labels, Tensor) and labels.dim() == 2:
            checks.embeddings(name, labels)
            if rows is not None and labels.shape[0] != rows:
                raise ValueError(f"{name} must have one row per support ({rows}), got {labels.shape[0]}")
            return labels
        if self.num_classes is None:
            raise ValueError(f"{name} as class indices need PAWSLoss(num_classes=...)")
        if rows is None:
            rows = labels.shape[0] if isinstance(labels, Tensor) and labels.dim() == 1 else -1
        indices = checks.class_labels(name, labels, rows, getattr(labels, "device", None), self.num_classes)
        return smoothed_one_hot(indices, self.num_classes, self.label_smoothing)

    def _supports(self, supports: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.gather is None or not is_distributed():
            return supports, labels
        return all_gather_rows(supports, self.gather), all_gather_plain(labels.contiguous())

    def forward(
        self,
        anchor_views: Tensor,
        anchor_supports: Tensor,
        anchor_support_labels: Tensor,
        target_views: Tensor,
        target_supports: Tensor,
        target_support_labels: Tensor,
    ) -> tuple[Tensor, Tensor]:
        checks.embeddings("anchor_views", anchor_views)
        width = anchor_views.shape[1]
        checks.embeddings("anchor_supports", anchor_supports, width=width)
        checks.embeddings("target_views", target_views, width=width)
        checks.embeddings("target_supports", target_supports, width=width)
        views = 2 + self.multicrop
        if anchor_views.shape[0] % views or target_views.shape[0] * views != 2 * anchor_views.shape[0]:
            raise ValueError(
                f"anchor_views must hold {views} views of B images and target_views 2 of them, got "
                f"{anchor_views.shape[0]} and {target_views.shape[0]} rows"
            )
        batch = anchor_views.shape[0] // views
        exact = torch.promote_types(anchor_views.dtype, torch.float32)  # fp32 at least: bf16 inputs are widened
        anchor_rows = self.support_rows(anchor_support_labels, "anchor_support_labels", anchor_supports.shape[0])
        target_rows = self.support_rows(target_support_labels, "target_support_labels", target_supports.shape[0])
        supports, labels = self._supports(anchor_supports.to(exact), anchor_rows.to(exact))
        probs = soft_nearest_neighbours(anchor_views.to(exact), supports, labels, self.temperature, self.snn)
        with torch.no_grad():
            t_supports, t_labels = self._supports(target_supports.to(exact), target_rows.to(exact))
            targets = sharpen(
                soft_nearest_neighbours(target_views.to(exact), t_supports, t_labels, self.temperature, self.snn),
                self.sharpen_temperature,
            )
            if self.multicrop:
                small = 0.5 * (targets[:batch] + targets[batch:])
                targets = torch.cat([targets, small.repeat(self.multicrop, 1)])
            targets = torch.where(targets < 1e-4, torch.zeros_like(targets), targets)
        # log(p^-t), not -t log p: a target of 0 on a probability of 0 adds 0, not NaN.
        cross_entropy = torch.log(probs ** (-targets)).sum(dim=1).mean()
        me_max = probs.new_zeros(())
        if self.me_max:
            mean = sharpen(probs, self.sharpen_temperature).mean(dim=0)
            if self.gather is not None and is_distributed():
                mean = _MeanAcrossRanks.apply(mean)
            me_max = (mean * torch.log(mean)).sum()
        return cross_entropy, me_max
