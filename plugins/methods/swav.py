"""SwAV (Caron et al. 2020) with multi-crop; the base class adds SuNCEt or cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.errors import ConfigError
from suncet.losses import SwAVLoss
from suncet.methods import Method, MethodConfig, Views, projection_head
from suncet.registry import register_method


@register_method(
    "swav", description="SwAV (Sinkhorn codes, swapped prediction, multi-crop) + SuNCEt (or cross-entropy)"
)
class SwAV(Method):
    """Codes of the two large crops (Sinkhorn-Knopp, no gradient) are predicted from every other
    crop through K prototypes; SuNCEt compares the labeled images' normalised embeddings."""

    may_skip_parameters = True  # the prototypes while frozen

    @dataclass
    class Options:
        prototypes: int = 0  # 0: three per class (3000 for ImageNet, as SwAV)
        temperature: float = 0.1  # of the swapped prediction; SuNCEt uses the run's tau
        local_crops: int = 6
        sinkhorn_eps: float = 0.05
        sinkhorn_iters: int = 3
        freeze_prototypes_epochs: float = 1.0
        queue_length: int = 0
        queue_start_epoch: int = 0

    def __init__(self, backbone: nn.Module, config: MethodConfig):
        super().__init__(backbone, config)
        o = self.options
        if (
            o.prototypes < 0
            or o.prototypes == 1
            or o.local_crops < 0
            or o.sinkhorn_iters < 1
            or o.sinkhorn_eps <= 0
            or o.queue_length < 0
            or o.freeze_prototypes_epochs < 0
            or o.temperature <= 0
        ):
            raise ConfigError(
                "swav options need prototypes >= 2 (or 0 for three per class), local_crops >= 0, sinkhorn_iters >= 1, "
                "sinkhorn_eps > 0, queue_length >= 0, freeze_prototypes_epochs >= 0, temperature > 0"
            )
        self.local_views = o.local_crops
        self.head = projection_head(backbone.feature_dim, config.train.proj_hidden, config.train.proj_dim)
        self.prototypes = nn.Linear(config.train.proj_dim, o.prototypes or 3 * config.num_classes, bias=False)
        self.freeze_iters = round(o.freeze_prototypes_epochs * config.steps_per_epoch)
        self.swav_loss = SwAVLoss(o.temperature, o.sinkhorn_iters, o.sinkhorn_eps)
        # Past embeddings of the two large crops, used only to compute codes for small batches.
        self.register_buffer("queue", torch.zeros(2, o.queue_length, config.train.proj_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def after_optimizer_step(self, step: int) -> None:
        self.normalize_prototypes()

    def rank_state(self) -> dict[str, Tensor]:
        # Each rank queues its own embeddings; the checkpoint keeps every rank's queue.
        return {"queue": self.queue.clone(), "queue_filled": self.queue_filled.clone()}

    def load_rank_state(self, state: dict[str, Tensor]) -> None:
        self.queue.copy_(state["queue"])
        self.queue_filled.copy_(state["queue_filled"])

    def project(self, features: Tensor) -> Tensor:
        return F.normalize(self.head(features).float(), dim=1)

    def objective(self, views: Views) -> dict[str, Tensor]:
        embeddings = list(self.project(views.global_features).chunk(self.global_views))
        if views.local_views:
            local_sizes = [v.shape[0] for v in views.local_views]
            embeddings += list(self.project(self.encode(torch.cat(views.local_views))).split(local_sizes))
        # Frozen prototypes get no gradient at all, so the optimizer leaves them untouched.
        weight = self.prototypes.weight.detach() if views.step < self.freeze_iters else self.prototypes.weight
        scores = [z @ weight.float().T for z in embeddings]
        assigned = len(views.global_views)
        swav = self.swav_loss(scores[:assigned], scores[assigned:], self._queued_scores(assigned, views.epoch))
        self._enqueue_all(embeddings[:assigned], views.epoch)
        return {"loss": swav, "swav": swav}

    @torch.no_grad()
    def _queued_scores(self, crops: int, epoch: int) -> list[Tensor | None]:
        """Each large crop's queued embeddings as prototype scores, once the queue is full."""
        o = self.options
        if not (o.queue_length > 0 and epoch >= o.queue_start_epoch and int(self.queue_filled) >= o.queue_length):
            return [None] * crops
        return [self.queue[crop] @ self.prototypes.weight.float().T for crop in range(crops)]

    @torch.no_grad()
    def _enqueue_all(self, embeddings: list[Tensor], epoch: int) -> None:
        o = self.options
        if o.queue_length > 0 and epoch >= o.queue_start_epoch and self.training:
            for crop, z in enumerate(embeddings):
                self._enqueue(crop, z.detach())

    @torch.no_grad()
    def _enqueue(self, crop: int, z: Tensor) -> None:
        length = self.options.queue_length
        z = z[-length:]
        self.queue[crop] = torch.cat([z, self.queue[crop][: length - z.shape[0]]])
        if crop == len(self.queue) - 1:
            self.queue_filled.copy_(torch.clamp(self.queue_filled + z.shape[0], max=length))
