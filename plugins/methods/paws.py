"""PAWS (Assran et al. 2021): views classified by a soft nearest-neighbour over labeled supports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor, nn

from suncet.errors import ConfigError
from suncet.losses import PAWSLoss
from suncet.methods import Method, MethodConfig, Views
from suncet.registry import Range, register_method

# `# fmt: skip` keeps each head as a table: one Linear-BN-ReLU block a line.


def projection_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """PAWS's projection: Linear-BN-ReLU, Linear-BN-ReLU, Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )  # fmt: skip


def prediction_mlp(dim: int) -> nn.Sequential:
    """PAWS's prediction head: BN-Linear(d, d/4)-BN-ReLU-Linear(d/4, d)."""
    return nn.Sequential(
        nn.BatchNorm1d(dim), nn.Linear(dim, dim // 4), nn.BatchNorm1d(dim // 4), nn.ReLU(inplace=True),
        nn.Linear(dim // 4, dim),
    )  # fmt: skip


@register_method(
    "paws", description="PAWS: views classified by a soft nearest-neighbour over labeled supports (needs labels)"
)
class PAWS(Method):
    """Anchors (every view, after the prediction head) are classified against the supports (the
    step's class-balanced labeled batch) and learn the sharpened prediction of the other large
    view (before the head, no gradient), with me-max; method.md section 9."""

    objective_uses_labels = True

    @dataclass
    class Options:
        temperature: Annotated[float, Range(0, low_open=True)] = 0.1  # of the soft nearest neighbour
        sharpen_temperature: Annotated[float, Range(0, low_open=True)] = 0.25
        local_crops: Annotated[int, Range(0, 64)] = 6
        label_smoothing: Annotated[float, Range(0, 0.99)] = 0.1
        me_max: bool = True
        prediction_head: bool = True

    def __init__(self, backbone: nn.Module, config: MethodConfig):
        super().__init__(backbone, config)
        o, train = self.options, config.train
        if o.prediction_head and train.proj_dim < 4:
            raise ConfigError(
                f"paws's prediction head narrows proj-dim by 4: proj-dim must be >= 4, got {train.proj_dim}"
            )
        self.local_views = o.local_crops
        self.projection = projection_mlp(backbone.feature_dim, train.proj_hidden, train.proj_dim)
        self.prediction = prediction_mlp(train.proj_dim) if o.prediction_head else nn.Identity()
        self.paws_loss = PAWSLoss(
            o.temperature,
            o.sharpen_temperature,
            o.local_crops,
            o.me_max,
            o.label_smoothing,
            config.num_classes,
            gather=config.losses.gather,
        )

    def objective(self, views: Views) -> dict[str, Tensor]:
        parts = [views.labeled_features, views.global_features]
        if views.local_views:
            parts.append(self.encode(torch.cat(views.local_views)))
        # One projection over supports and every view: its BatchNorm sees them together, as in PAWS.
        h = self.projection(torch.cat(parts))
        z = self.prediction(h)
        supports, batch = views.labeled_features.shape[0], views.batch_size
        targets = h[supports : supports + 2 * batch].detach()
        swapped = torch.cat([targets[batch:], targets[:batch]])  # view 1 learns view 2's assignment, and back
        cross_entropy, me_max = self.paws_loss(
            z[supports:], z[:supports], views.labels, swapped, h[:supports].detach(), views.labels
        )
        return {"loss": cross_entropy + me_max, "paws": cross_entropy, "me_max": me_max}
