"""SimCLR with the SuNCEt term: NT-Xent on unlabeled views, SuNCEt on labeled views."""

from __future__ import annotations

import torch
from torch import Tensor

from suncet.losses import nt_xent, nt_xent_and_suncet
from suncet.methods import Method, MethodConfig, TrainBatch, labeled_term, projection_head
from suncet.registry import register_method


@register_method("simclr", description="SimCLR (NT-Xent) + SuNCEt (or cross-entropy) on the labeled subset")
class SimCLR(Method):
    """One forward pass over [view1; view2; labeled]; loss = NT-Xent + weight * SuNCEt (both
    terms in one fused launch), or NT-Xent + weight * cross-entropy with ``label_loss: ce``."""

    def __init__(self, backbone, config: MethodConfig):
        super().__init__(backbone, config)
        self.head = projection_head(backbone.feature_dim, config.train.proj_hidden, config.train.proj_dim)
        self.uses_labels = config.train.suncet_weight > 0

    def forward(self, batch: TrainBatch) -> dict[str, Tensor]:
        cfg, gather = self.config.train, self.config.gather
        parts = [*batch.global_views] + ([batch.labeled] if batch.labeled is not None else [])
        features = self.backbone(torch.cat(parts))
        z = self.head(features)
        unlabeled = 2 * batch.global_views[0].shape[0]
        if batch.labeled is None:
            ntxent = nt_xent(z, cfg.tau, backend=cfg.backend, gather=gather)
            return {"loss": ntxent, "ntxent": ntxent}
        if self.label_head is None:
            ntxent, suncet = nt_xent_and_suncet(
                z[:unlabeled], z[unlabeled:], batch.labels, cfg.tau, backend=cfg.backend, gather=gather
            )
            label = {"suncet": suncet}
        else:
            ntxent = nt_xent(z[:unlabeled], cfg.tau, backend=cfg.backend, gather=gather)
            label = labeled_term(self, features[unlabeled:], z[unlabeled:], batch.labels)
        return {"loss": ntxent + cfg.suncet_weight * next(iter(label.values())), "ntxent": ntxent, **label}
