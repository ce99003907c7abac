"""What the data path hands a training step: one step's augmented views, on the training device."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class TrainBatch:
    """One step's augmented inputs, already on the training device.

    ``global_views`` are the large crops of the unlabeled images (SimCLR: view1, view2),
    ``local_views`` the small crops (SwAV multi-crop), ``labeled`` one large crop of each
    labeled image with its ``labels``; ``labeled`` is None while the labeled term is off.
    """

    global_views: list[Tensor]
    local_views: list[Tensor] = field(default_factory=list)
    labeled: Tensor | None = None
    labels: Tensor | None = None
    epoch: int = 0
    step: int = 0
