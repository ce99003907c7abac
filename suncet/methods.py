"""The interface of method plugins: what a training step hands a method, and what it returns."""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.config import TrainConfig
from suncet.errors import ConfigError, shown
from suncet.losses import ContrastiveLosses
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
class Views:
    """What a method's own objective sees of one step: the unlabeled images only.

    ``global_features`` are the backbone features of the large crops, view after view
    ([global_views * B, F], from one backbone pass that also carried the labeled images);
    ``global_views`` the crops themselves, ``local_views`` the small crops (not encoded: a
    method encodes them as it needs). ``labeled_features`` and ``labels`` are set only for a
    method whose objective uses the labels itself (``Method.objective_uses_labels``).
    """

    global_views: list[Tensor]
    global_features: Tensor | None  # None for a method without global views
    local_views: list[Tensor] = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    labeled_features: Tensor | None = None
    labels: Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Unlabeled images in the step (B): rows of each view."""
        return self.global_views[0].shape[0] if self.global_views else 0


@dataclass
class MethodConfig:
    """What a method is built from: the run's settings, the facts of its data, and its losses.

    ``train`` is the whole ``TrainConfig`` (``train.proj_dim``, ``train.proj_hidden``, ...); the
    method's own options come parsed from ``train.method_options`` as ``Method.options``.
    ``losses`` are the run's contrastive losses, built once with its temperature (``tau``),
    kernel backend and how other ranks' rows are seen; built from ``train`` when omitted.
    """

    train: TrainConfig
    num_classes: int
    steps_per_epoch: int = 1
    losses: ContrastiveLosses | None = None

    def __post_init__(self):
        if self.losses is None:
            self.losses = ContrastiveLosses.build(self.train.tau, self.train.backend)

    @property
    def gather(self) -> str | None:
        """Deprecated: the losses in ``losses`` already see other ranks' rows as the run needs."""
        warnings.warn("MethodConfig.gather is deprecated: use the losses in MethodConfig.losses, which hold it",
                      DeprecationWarning, stacklevel=2)
        return self.losses.gather


class Method(nn.Module):
    """Base class of a pre-training method plugin.

    A subclass builds its heads in ``__init__`` and implements ``objective(views)``: its own
    loss on the unlabeled views, returned as ``{"loss": total, name: term, ...}``. The base
    class adds the labeled term to it: SuNCEt on ``project(features)`` of the labeled images,
    or the cross-entropy of a linear classifier on their features (``label_loss: ce``), times
    ``suncet_weight``, logged as ``suncet`` or ``ce``, switched off after ``suncet_epochs``
    (no labeled batch is then loaded, nor at weight 0). The labeled images share the backbone
    pass of the large crops.

    A method that computes its objective and SuNCEt in one launch overrides
    ``objective_with_suncet``; its result must equal the two computed apart.
    """

    global_views: ClassVar[int] = 2
    local_views: int = 0
    # True when the objective itself consumes the labeled batch (Views.labeled_features): the
    # base class then adds no labeled term, and the method cannot train without labels.
    objective_uses_labels: ClassVar[bool] = False
    # True when some steps leave parameters without gradients (DDP must then look for them).
    may_skip_parameters: ClassVar[bool] = False

    @dataclass
    class Options:
        """Method-specific options (none by default)."""

    def __init__(self, backbone: nn.Module, config: MethodConfig):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.losses = config.losses
        self.options = parse_options(type(self).Options, config.train.method_options, type(self).__name__)
        train, name = config.train, type(self).__name__
        self._returns_whole_loss = type(self).forward is not Method.forward
        self._fuses_suncet = type(self).objective_with_suncet is not Method.objective_with_suncet
        if self.objective_uses_labels and train.label_loss != "suncet":
            raise ConfigError(f"method {name} uses the labels in its own objective; --label-loss does not apply to it")
        if self.needs_labels:
            if train.suncet_weight == 0:
                raise ConfigError(f"method {name} trains on labeled images, but --suncet-weight 0 turns them off")
            if train.suncet_epochs is not None and train.suncet_epochs < train.epochs:
                raise ConfigError(f"method {name} trains on labeled images in every epoch; --suncet-epochs cannot stop them")
        self.label_loss = None if self.objective_uses_labels or train.suncet_weight == 0 else train.label_loss
        if self._returns_whole_loss:
            _accept_whole_loss_forward(name, self.label_loss)
        elif type(self).objective is Method.objective and (self.global_views or self.local_views):
            raise ConfigError(f"method {name} loads unlabeled views but defines no objective(views) (docs/plugins.md)")
        if self.label_loss == "suncet" and type(self).project is Method.project and not self._returns_whole_loss:
            raise ConfigError(f"method {name} defines no project(features) for SuNCEt to compare; define it, or use --label-loss ce")
        # The paper's other way to use labels in pre-training: cross-entropy through a linear
        # classifier on the backbone features, in place of SuNCEt.
        self.label_head = nn.Linear(backbone.feature_dim, config.num_classes) if self.label_loss == "ce" else None
        if self.label_head is not None and train.suncet_epochs is not None:
            self.may_skip_parameters = True  # unused once the labeled term is switched off

    @property
    def needs_labels(self) -> bool:
        """Whether the method has no objective without labeled images."""
        return self.objective_uses_labels or not (self.global_views or self.local_views)

    def objective(self, views: Views) -> dict[str, Tensor]:
        """The method's own loss on the unlabeled views: ``{"loss": total, name: term, ...}``
        (every entry is logged). Nothing for a method without unlabeled views."""
        return {}

    def project(self, features: Tensor) -> Tensor:
        """The embedding of backbone ``features`` that SuNCEt compares (the method's projection)."""
        raise NotImplementedError

    def objective_with_suncet(self, views: Views, labeled_features: Tensor, labels: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Hook for a method that computes ``objective(views)`` and SuNCEt of the labeled images
        in one fused launch: returns (the objective's terms, the SuNCEt term)."""
        raise NotImplementedError

    def encode(self, images: Tensor) -> Tensor:
        """Backbone features of a batch of images (one pass: BatchNorm sees them together)."""
        return self.backbone(images)

    def forward(self, batch: TrainBatch) -> dict[str, Tensor]:
        """The step's loss terms: the objective's, the labeled term, and their total ``loss``."""
        labeled = batch.labeled
        images = [*batch.global_views] + ([labeled] if labeled is not None else [])
        features = self.encode(torch.cat(images)) if images else None
        unlabeled_rows = sum(v.shape[0] for v in batch.global_views)
        labeled_features = features[unlabeled_rows:] if labeled is not None else None
        own_labels = self.objective_uses_labels and labeled is not None
        views = Views(
            batch.global_views, features[:unlabeled_rows] if features is not None else None, batch.local_views,
            batch.epoch, batch.step, labeled_features if own_labels else None, batch.labels if own_labels else None,
        )  # fmt: skip
        if self.label_loss is None or labeled is None:
            return _with_total(self.objective(views))
        if self.label_loss == "ce":
            terms, term = self.objective(views), F.cross_entropy(self.label_head(labeled_features).float(), batch.labels)
        elif self._fuses_suncet:
            terms, term = self.objective_with_suncet(views, labeled_features, batch.labels)
        else:
            terms, term = self.objective(views), self.losses.suncet(self.project(labeled_features), batch.labels)
        if self.label_loss in terms:
            raise ConfigError(f"method {type(self).__name__}'s objective returns a '{self.label_loss}' term, which the base class adds")
        weighted = self.config.train.suncet_weight * term
        return _with_total({**terms, self.label_loss: term}, weighted)

    def wants_labeled(self, epoch: int) -> bool:
        """Whether ``epoch``'s steps load a labeled batch: while the labeled term is on, or always
        for a method whose objective uses the labels."""
        if self.needs_labels:
            return True
        limit = self.config.train.suncet_epochs
        return self.label_loss is not None and (limit is None or epoch < limit)

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step (SwAV re-normalises its prototypes here)."""

    def rank_state(self) -> dict[str, Tensor]:
        """State that differs between ranks under DDP (SwAV's queue): saved for every rank."""
        return {}

    def load_rank_state(self, state: dict[str, Tensor]) -> None:
        """Restore what ``rank_state`` returned on this rank."""


def _with_total(terms: dict[str, Tensor], labeled: Tensor | None = None) -> dict[str, Tensor]:
    """``terms`` with ``loss``: the objective's own total plus the weighted labeled term."""
    own = terms.get("loss")
    if own is None and labeled is None:
        raise ConfigError("a method's objective must return its total as 'loss'")
    total = labeled if own is None else own if labeled is None else own + labeled
    return {**terms, "loss": total}


def _accept_whole_loss_forward(name: str, label_loss: str | None) -> None:
    """A plugin of the earlier contract overrides ``forward`` and adds its labeled term itself:
    it keeps working as it did with SuNCEt, and is refused where it could silently drop a
    cross-entropy term."""
    contract = "implement objective(views) and let suncet.methods.Method add the labeled term (docs/plugins.md)"
    if label_loss == "ce":
        raise ConfigError(f"method {name} overrides forward() and adds its labeled term itself, so it may ignore "
                          f"--label-loss ce; {contract}")
    warnings.warn(f"method {name} overrides forward() (the earlier method contract); {contract}", FutureWarning, stacklevel=3)


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
    """Deprecated (Method.forward runs the one backbone pass): same-resolution parts through
    backbone and head as one batch."""
    warnings.warn("suncet.methods.forward_in_one_pass is deprecated: Method.forward encodes the large crops and the "
                  "labeled images in one pass (docs/plugins.md)", DeprecationWarning, stacklevel=2)
    sizes = [p.shape[0] for p in parts]
    out = head(backbone(torch.cat(parts)))
    return list(out.split(sizes))
