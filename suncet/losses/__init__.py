"""Contrastive losses: NT-Xent (SimCLR), SuNCEt, and the general multi-positive form.

All take raw projections and L2-normalise them; all reduce to one operation (per row: LSE
over the columns it may see minus LSE over its positives) that the kernels implement.
"""

from suncet.losses.contrastive import contrastive_loss, nt_xent, nt_xent_and_suncet, suncet_loss
from suncet.losses.swav import sinkhorn, swapped_prediction_loss

__all__ = ["contrastive_loss", "nt_xent", "nt_xent_and_suncet", "sinkhorn", "suncet_loss", "swapped_prediction_loss"]
