"""The interface of method plugins: what a training step hands a method, and what it returns."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.config import TrainConfig
from suncet.errors import ConfigError, shown
from suncet.losses import suncet_loss
from suncet.registry import checked_option


@dataclass
class TrainBatch:
    """One step's augmented inputs, already on the training device.

    ``global_views`` are the large crops of the unlabeled images (SimCLR: view1, view2),
    ``local_views`` the small crops (SwAV multi-crop), ``labeled`` one large crop of each
    labeled image with its ``labels``; ``labeled`` is None once SuNCEt is switched off.
    """

    global_views: list[Tensor]
    local_views: list[Tensor] = field(default_factory=list)
    labeled: Tensor | None = None
    labels: Tensor | None = None
    epoch: int = 0
    step: int = 0


@dataclass
class MethodConfig:
    """What a method is built from: the run's training settings and the facts of its data.

    ``train`` is the whole ``TrainConfig`` (``train.tau``, ``train.suncet_weight``,
    ``train.proj_dim``, ``train.backend``, ...); the method's own options come parsed from
    ``train.method_options`` as ``Method.options``.
    """

    train: TrainConfig
    num_classes: int
    steps_per_epoch: int = 1
    # How the contrastive terms see other ranks' rows: None (one process), "grad" or "detached".
    gather: str | None = None


class Method(nn.Module):
    """Base class of a pre-training method plugin.

    A subclass receives the backbone (``backbone.feature_dim`` features per image) and a
    ``MethodConfig``, builds its heads, and implements ``forward(batch) -> dict`` returning
    the total ``"loss"`` and any named terms to log. ``uses_labels`` says whether it wants a
    labeled batch each step; ``global_views``/``local_views`` how many crops of each
    unlabeled image it wants (0 global views: no unlabeled images are loaded).
    """

    global_views: ClassVar[int] = 2
    local_views: int = 0
    uses_labels: bool = True
    # True when some steps leave parameters without gradients (DDP must then look for them).
    may_skip_parameters: ClassVar[bool] = False

    @dataclass
    class Options:
        """Method-specific options (none by default)."""

    def __init__(self, backbone: nn.Module, config: MethodConfig):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.options = parse_options(type(self).Options, config.train.method_options, type(self).__name__)
        # The paper's other way to use labels in pre-training: cross-entropy through a linear
        # classifier on the backbone features, in place of SuNCEt (label_loss: ce).
        self.label_head = None
        if config.train.label_loss == "ce":
            self.label_head = nn.Linear(backbone.feature_dim, config.num_classes)
            # Unused once the labeled term is switched off: DDP must then look for it.
            self.may_skip_parameters = type(self).may_skip_parameters or config.train.suncet_epochs is not None

    def forward(self, batch: TrainBatch) -> dict[str, Tensor]:
        raise NotImplementedError

    def wants_labeled(self, epoch: int) -> bool:
        """Whether ``epoch``'s steps load a labeled batch (SuNCEt stops after ``suncet_epochs``)."""
        limit = self.config.train.suncet_epochs
        return self.uses_labels and (limit is None or epoch < limit)

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step (SwAV re-normalises its prototypes here)."""

    def rank_state(self) -> dict[str, Tensor]:
        """State that differs between ranks under DDP (SwAV's queue): saved for every rank."""
        return {}

    def load_rank_state(self, state: dict[str, Tensor]) -> None:
        """Restore what ``rank_state`` returned on this rank."""


def labeled_term(method: Method, features: Tensor, z: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """The labeled term on one view per labeled image: SuNCEt on their projections ``z``, or the
    cross-entropy of ``method.label_head`` on their backbone ``features`` (``label_loss: ce``)."""
    train = method.config.train
    if method.label_head is not None:
        return {"ce": F.cross_entropy(method.label_head(features).float(), labels)}
    return {"suncet": suncet_loss(z, labels, train.tau, backend=train.backend, gather=method.config.gather)}


def parse_options(options_cls: type, values: dict[str, Any], owner: str) -> Any:
    """Build a method's Options dataclass, rejecting unknown keys and values of the wrong type,
    non-finite numbers and values outside a declared ``Range`` (``Annotated[float, Range(0, 1)]``)."""
    known = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown option {shown(unknown[0])} for method {owner}; known: {', '.join(sorted(known)) or 'none'}"
        )
    hints = typing.get_type_hints(options_cls, include_extras=True)
    converted = {
        name: checked_option(f"method {owner}", name, value, hints.get(name), known[name].default)
        for name, value in values.items()
    }
    return options_cls(**converted)


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear - ReLU - Linear, the paper's projection head."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def forward_in_one_pass(backbone: nn.Module, head: nn.Module, parts: list[Tensor]) -> list[Tensor]:
    """Run same-resolution parts through backbone and head as one batch (shared BN statistics)."""
    sizes = [p.shape[0] for p in parts]
    out = head(backbone(torch.cat(parts)))
    return list(out.split(sizes))
