"""The losses: NT-Xent (SimCLR), SuNCEt, their fused pair, the general multi-positive form,
SwAV's swapped prediction, PAWS's soft nearest-neighbour assignments, BYOL's negative cosine
similarity, MoCo's InfoNCE against a queue of keys, DINO's self-distillation, and the
redundancy-reduction losses of VICReg and Barlow Twins (``redundancy.py``).

As modules that hold their settings, for any training loop (``contrastive.py``, ``modules.py``,
``paws.py``, ``dino.py``)::

    from suncet.losses import NTXentLoss, SuNCEtLoss
    ntxent, suncet = NTXentLoss(temperature=0.1), SuNCEtLoss(temperature=0.1)
    loss = ntxent(out0, out1) + suncet(labeled_out, labels)

and, for one-off calls, as functions of the same losses. The contrastive ones take raw
projections and L2-normalise them, and reduce to one operation (per row: LSE over the columns it
may see minus LSE over its positives) that the kernels implement. Every argument enters through
the checks of ``checks.py``.
"""

from suncet.losses.byol import NegativeCosineSimilarity
from suncet.losses.contrastive import contrastive_loss, multi_positive_loss, nt_xent, nt_xent_and_suncet, suncet_loss
from suncet.losses.dino import DINOLoss
from suncet.losses.moco import MoCoLoss
from suncet.losses.modules import (
    ContrastiveLosses,
    MultiPositiveContrastiveLoss,
    NTXentLoss,
    NTXentSuNCEtLoss,
    SuNCEtLoss,
    SwAVLoss,
)
from suncet.losses.paws import PAWSLoss, soft_nearest_neighbours
from suncet.losses.redundancy import BarlowTwinsLoss, VICRegLoss
from suncet.losses.swav import sinkhorn, swapped_prediction_loss

__all__ = [
    "BarlowTwinsLoss",
    "ContrastiveLosses",
    "DINOLoss",
    "MoCoLoss",
    "MultiPositiveContrastiveLoss",
    "NTXentLoss",
    "NTXentSuNCEtLoss",
    "NegativeCosineSimilarity",
    "PAWSLoss",
    "SuNCEtLoss",
    "SwAVLoss",
    "VICRegLoss",
    "contrastive_loss",
    "multi_positive_loss",
    "nt_xent",
    "nt_xent_and_suncet",
    "sinkhorn",
    "soft_nearest_neighbours",
    "suncet_loss",
    "swapped_prediction_loss",
]
