"""SwAV (Caron et al. 2020) with multi-crop, plus the SuNCEt term on labeled images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.errors import ConfigError
from suncet.losses.swav import sinkhorn, swapped_prediction_loss
from suncet.methods import Method, MethodConfig, TrainBatch, labeled_term, projection_head
from suncet.registry import register_method


@register_method("swav", description="SwAV (Sinkhorn codes, swapped prediction, multi-crop) + SuNCEt (or cross-entropy)")
class SwAV(Method):
    """Codes of the two large crops (Sinkhorn-Knopp, no gradient) are predicted from every other
    crop through K prototypes; SuNCEt acts on the labeled images' normalised embeddings."""

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
        if (o.prototypes < 0 or o.prototypes == 1 or o.local_crops < 0 or o.sinkhorn_iters < 1 or o.sinkhorn_eps <= 0
                or o.queue_length < 0 or o.freeze_prototypes_epochs < 0 or o.temperature <= 0):
            raise ConfigError(
                "swav options need prototypes >= 2 (or 0 for three per class), local_crops >= 0, sinkhorn_iters >= 1, "
                "sinkhorn_eps > 0, queue_length >= 0, freeze_prototypes_epochs >= 0, temperature > 0"
            )
        self.local_views = o.local_crops
        self.head = projection_head(backbone.feature_dim, config.train.proj_hidden, config.train.proj_dim)
        self.prototypes = nn.Linear(config.train.proj_dim, o.prototypes or 3 * config.num_classes, bias=False)
        self.freeze_iters = round(o.freeze_prototypes_epochs * config.steps_per_epoch)
        self.uses_labels = config.train.suncet_weight > 0
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

    def embed(self, features: Tensor) -> Tensor:
        return F.normalize(self.head(features).float(), dim=1)

    def forward(self, batch: TrainBatch) -> dict[str, Tensor]:
        sizes = [v.shape[0] for v in batch.global_views]
        labeled = [batch.labeled] if batch.labeled is not None else []
        # One pass per resolution: the large crops with the labeled view, then the small crops.
        features = self.backbone(torch.cat([*batch.global_views, *labeled]))
        embeddings = list(self.embed(features).split(sizes + [v.shape[0] for v in labeled]))
        z_labeled = embeddings.pop() if labeled else None
        if batch.local_views:
            local_sizes = [v.shape[0] for v in batch.local_views]
            embeddings += list(self.embed(self.backbone(torch.cat(batch.local_views))).split(local_sizes))

        # Frozen prototypes get no gradient at all, so the optimizer leaves them untouched.
        weight = self.prototypes.weight.detach() if batch.step < self.freeze_iters else self.prototypes.weight
        scores = [z @ weight.float().T for z in embeddings]
        codes = [self._codes(i, embeddings[i], scores[i], batch.epoch) for i in range(len(batch.global_views))]
        swav = swapped_prediction_loss(scores, codes, self.options.temperature)
        terms = {"swav": swav}
        loss = swav
        if z_labeled is not None:
            label = labeled_term(self, features[sum(sizes):], z_labeled, batch.labels)
            terms.update(label)
            loss = loss + self.config.train.suncet_weight * next(iter(label.values()))
        return {"loss": loss, **terms}

    @torch.no_grad()
    def _codes(self, crop: int, z: Tensor, scores: Tensor, epoch: int) -> Tensor:
        o = self.options
        scores = scores.detach()
        use_queue = o.queue_length > 0 and epoch >= o.queue_start_epoch
        if use_queue and int(self.queue_filled) >= o.queue_length:
            queued = self.queue[crop] @ self.prototypes.weight.float().T
            codes = sinkhorn(torch.cat([queued, scores]), o.sinkhorn_eps, o.sinkhorn_iters)[-scores.shape[0]:]
        else:
            codes = sinkhorn(scores, o.sinkhorn_eps, o.sinkhorn_iters)
        if use_queue and self.training:
            self._enqueue(crop, z.detach())
        return codes

    @torch.no_grad()
    def _enqueue(self, crop: int, z: Tensor) -> None:
        length = self.options.queue_length
        z = z[-length:]
        self.queue[crop] = torch.cat([z, self.queue[crop][: length - z.shape[0]]])
        if crop == len(self.queue) - 1:
            self.queue_filled.copy_(torch.clamp(self.queue_filled + z.shape[0], max=length))
