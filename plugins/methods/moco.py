"""MoCo v2 (Chen et al. 2020): queries against their keys from a moving-average key encoder and
a queue of past keys; the base class adds SuNCEt or cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from suncet.ema import EMA
from suncet.errors import ConfigError
from suncet.losses import MoCoLoss
from suncet.methods import Method, MethodConfig, Views, projection_head
from suncet.registry import register_method


@register_method("moco", description="MoCo v2 (key encoder, queue of keys, InfoNCE) + SuNCEt (or cross-entropy)")
class MoCo(Method):
    """The query of the first view (backbone and MLP head) is pulled to its key, the second
    view through the key encoder (a moving average of backbone and head at a constant
    ``momentum``), and pushed from the ``queue_size`` keys of earlier steps, at ``temperature``;
    one direction, as MoCo v2's code. The keys of every rank then enter the queue (so each
    rank's queue is the same), which checkpoints carry with each rank's state. SuNCEt compares
    the head's outputs; evaluation and export use the query backbone."""

    @dataclass
    class Options:
        momentum: float = 0.999  # constant over the run
        temperature: float = 0.2  # of the queue comparison; SuNCEt uses the run's tau
        queue_size: int = 65536

    def __init__(self, backbone: nn.Module, config: MethodConfig):
        super().__init__(backbone, config)
        o, train = self.options, config.train
        if not (0 <= o.momentum <= 1) or o.temperature < 1e-3 or o.queue_size < 1:
            raise ConfigError("moco options need 0 <= momentum <= 1, temperature >= 0.001 and queue_size >= 1")
        self.head = projection_head(backbone.feature_dim, train.proj_hidden, train.proj_dim)
        self.key_encoder = EMA(self._online(), config.steps_per_epoch * train.epochs, o.momentum, o.momentum)
        # The comparison is this rank's queries against its queue: gathering would count the
        # (equal) queues of the other ranks again.
        self.moco_loss = MoCoLoss(
            o.temperature, (o.queue_size, train.proj_dim), backend=self.losses.ntxent.backend, gather="detached"
        )

    def _online(self) -> nn.Module:
        """The network the key encoder follows (a view of the query modules, not a copy)."""
        return nn.Sequential(self.backbone, self.head)

    def project(self, features: Tensor) -> Tensor:
        return self.head(features)

    def objective(self, views: Views) -> dict[str, Tensor]:
        queries = self.head(views.global_features[: views.batch_size])
        with torch.no_grad():
            keys = self.key_encoder(views.global_views[1])
        moco = self.moco_loss(queries, keys, update=self.training)
        return {"loss": moco, "moco": moco}

    def after_optimizer_step(self, step: int) -> None:
        self.key_encoder.update(self._online(), step)

    def rank_state(self) -> dict[str, Tensor]:
        return {"queue": self.moco_loss.bank.clone(), "queue_ptr": self.moco_loss.bank_ptr.clone()}

    def load_rank_state(self, state: dict[str, Tensor]) -> None:
        self.moco_loss.bank.copy_(state["queue"])
        self.moco_loss.bank_ptr.copy_(state["queue_ptr"])
