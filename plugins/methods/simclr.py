"""SimCLR with the SuNCEt term: NT-Xent on unlabeled views, SuNCEt on labeled views."""

from __future__ import annotations

import torch
from torch import Tensor

from suncet.losses import nt_xent, nt_xent_and_suncet
from suncet.methods import Method, MethodConfig, TrainBatch, forward_in_one_pass, projection_head
from suncet.registry import register_method


@register_method("simclr", description="SimCLR (NT-Xent) + SuNCEt on the labeled subset")
class SimCLR(Method):
    """One forward pass over [view1; view2; labeled]; loss = NT-Xent + weight * SuNCEt."""

    def __init__(self, backbone, config: MethodConfig):
        super().__init__(backbone, config)
        self.head = projection_head(backbone.feature_dim, config.train.proj_hidden, config.train.proj_dim)
        self.uses_labels = config.train.suncet_weight > 0

    def forward(self, batch: TrainBatch) -> dict[str, Tensor]:
        view1, view2 = batch.global_views
        cfg, gather = self.config.train, self.config.gather
        if batch.labeled is None:
            z1, z2 = forward_in_one_pass(self.backbone, self.head, [view1, view2])
            ntxent = nt_xent(torch.cat([z1, z2]), cfg.tau, backend=cfg.backend, gather=gather)
            return {"loss": ntxent, "ntxent": ntxent}
        z1, z2, z_labeled = forward_in_one_pass(self.backbone, self.head, [view1, view2, batch.labeled])
        ntxent, suncet = nt_xent_and_suncet(
            torch.cat([z1, z2]), z_labeled, batch.labels, cfg.tau, backend=cfg.backend, gather=gather
        )
        return {"loss": ntxent + cfg.suncet_weight * suncet, "ntxent": ntxent, "suncet": suncet}

