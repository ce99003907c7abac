"""Built-in label losses (``--label-loss``): how the labeled images enter pre-training."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from suncet.methods import LabeledTerm, LabeledTermConfig, Method, Views
from suncet.registry import register_label_loss


@register_label_loss("suncet", description="SuNCEt: supervised contrastive term on the method's projection (the paper)")
class SuNCEt(LabeledTerm):
    """SuNCEt on ``method.project(features)`` of the labeled images, with the run's temperature
    and backend; computed in one launch with the objective where the method can
    (``Method.objective_with_suncet``)."""

    name = "suncet"
    needs_projection = True

    def __init__(self, config: LabeledTermConfig):
        super().__init__(config)
        self.loss = config.losses.suncet

    def forward(self, method: Method, features: Tensor, labels: Tensor) -> Tensor:
        return self.loss(method.project(features), labels)

    def with_objective(
        self, method: Method, views: Views, features: Tensor, labels: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        return method.objective_with_suncet(views, features, labels)


@register_label_loss("ce", description="cross-entropy of a linear classifier on the backbone features")
class CrossEntropy(LabeledTerm):
    """The paper's other way to use labels in pre-training: the cross-entropy of a linear
    classifier (its own head, not part of the backbone) on the labeled images' features."""

    name = "ce"

    def __init__(self, config: LabeledTermConfig):
        super().__init__(config)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def forward(self, method: Method, features: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.head(features).float(), labels)
