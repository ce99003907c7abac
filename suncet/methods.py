"""The interface of method plugins and of the labeled term a run adds to their objective.

A method (``Method``) implements its own objective on the unlabeled views; the run builds the
labeled term (``LabeledTerm``: SuNCEt, cross-entropy, or a label-loss plugin of your own) where it
is assembled, and the base class adds it. docs/plugins.md is the guide.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from suncet.config import TrainConfig, option_value
from suncet.data import batch as data_batch
from suncet.errors import ConfigError, shown
from suncet.losses import ContrastiveLosses
from suncet.registry import LABEL_LOSSES, plugin_code


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


# ---------------------------------------------------------------------------------------------
# The labeled term


@dataclass
class LabeledTermConfig:
    """What a labeled term is built from: the run's settings, the facts of its data and model,
    and the run's contrastive losses (temperature, backend, how other ranks' rows are seen)."""

    train: TrainConfig
    feature_dim: int  # of the backbone features the term receives
    num_classes: int
    losses: ContrastiveLosses


class LabeledTerm(nn.Module):
    """Base class of a label-loss plugin (``--label-loss NAME``): what the labeled images add to a
    method's objective. ``forward(method, features, labels)`` is the term's value, unweighted, for
    the labeled images' backbone ``features``; a head it trains is its own submodule (optimised,
    checkpointed and synchronised with the method). The term owns its ``weight``
    (``--suncet-weight``) and ``switch_off_epoch`` (``--suncet-epochs``)."""

    name: ClassVar[str] = "labeled"  # the term's name in the step's terms and in metrics.csv
    needs_projection: ClassVar[bool] = False  # True: it compares method.project(features)

    def __init__(self, config: LabeledTermConfig):
        super().__init__()
        self.weight = config.train.suncet_weight
        self.switch_off_epoch = config.train.suncet_epochs

    def active(self, epoch: int) -> bool:
        """Whether ``epoch``'s steps load a labeled batch and add this term."""
        return self.switch_off_epoch is None or epoch < self.switch_off_epoch

    @property
    def may_skip_parameters(self) -> bool:
        """Whether some steps leave this term's parameters without gradients (it has some and is
        switched off before the run ends): DDP must then look for unused parameters."""
        return self.switch_off_epoch is not None and any(p.requires_grad for p in self.parameters())

    def forward(self, method: Method, features: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError(f"label loss {type(self).__name__} defines no forward(method, features, labels)")

    def with_objective(
        self, method: Method, views: Views, features: Tensor, labels: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The method's objective terms and this term's value. A term that a method may compute in
        one launch with its objective overrides this (SuNCEt calls ``Method.objective_with_suncet``)."""
        return method.objective(views), self(method, features, labels)


def labeled_term_from_settings(
    train: TrainConfig, method_cls: type[Method], feature_dim: int, num_classes: int, losses: ContrastiveLosses
) -> LabeledTerm | None:
    """The labeled term ``train`` names (``label_loss``, ``suncet_weight``, ``suncet_epochs``) for a
    method of ``method_cls``: None at weight 0, and for a method whose objective uses the labels itself."""
    if method_cls.objective_uses_labels or train.suncet_weight == 0:
        return None
    info = LABEL_LOSSES.get(train.label_loss)
    with plugin_code(info):
        term = info.obj(LabeledTermConfig(train, feature_dim, num_classes, losses))
    if not isinstance(term, LabeledTerm):
        raise ConfigError(f"label loss plugin '{info.name}' did not build a suncet.methods.LabeledTerm")
    return term


# ---------------------------------------------------------------------------------------------
# Methods


class _FromSettings:
    def __repr__(self) -> str:
        return "FROM_SETTINGS"


# MethodConfig.labeled_term when the caller leaves it to the settings.
FROM_SETTINGS: Any = _FromSettings()


@dataclass
class MethodConfig:
    """What a method is built from: the run's settings, the facts of its data, its losses and its
    labeled term.

    ``train`` is the whole ``TrainConfig`` (``train.proj_dim``, ``train.proj_hidden``, ...); the
    method's own options come parsed from ``train.method_options`` as ``Method.options``.
    ``losses`` are the run's contrastive losses, built once with its temperature (``tau``),
    kernel backend and how other ranks' rows are seen; built from ``train`` when omitted.
    ``labeled_term`` is the term the base class adds (None: none); the one ``train`` names
    (``labeled_term_from_settings``) when omitted.
    """

    train: TrainConfig
    num_classes: int
    steps_per_epoch: int = 1
    losses: ContrastiveLosses | None = None
    labeled_term: LabeledTerm | None = FROM_SETTINGS

    def __post_init__(self):
        if self.losses is None:
            self.losses = ContrastiveLosses.build(self.train.tau, self.train.backend)

    @property
    def gather(self) -> str | None:
        """Deprecated: the losses in ``losses`` already see other ranks' rows as the run needs."""
        warnings.warn(
            "MethodConfig.gather is deprecated: use the losses in MethodConfig.losses, which hold it",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.losses.gather


class Method(nn.Module):
    """Base class of a pre-training method plugin.

    A subclass builds its heads in ``__init__`` and implements ``objective(views)``: its own
    loss on the unlabeled views, returned as ``{"loss": total, name: term, ...}``. The base
    class adds the run's labeled term to it (``self.labeled_term``: SuNCEt on
    ``project(features)`` of the labeled images, the cross-entropy of a linear classifier on
    their features, or another label loss), times its weight, logged under its name, until its
    switch-off epoch. The labeled images share the backbone pass of the large crops.

    What a method needs it declares in the class attributes below; what the settings may not
    take from it is checked once, in ``check_method``.
    """

    # Large crops of each unlabeled image per step (0: none loaded), and small crops (SwAV's
    # multi-crop; may be set per instance). A method with neither has no objective of its own.
    global_views: ClassVar[int] = 2
    local_views: int = 0
    # True when the objective itself consumes the labeled batch (Views.labeled_features): the
    # run then adds no labeled term, and the method cannot train without labels.
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
        term = config.labeled_term
        if term is FROM_SETTINGS:
            term = labeled_term_from_settings(
                config.train, type(self), backbone.feature_dim, config.num_classes, config.losses
            )
        check_method(type(self), term, config.train)
        self.labeled_term = term

    @property
    def needs_labels(self) -> bool:
        """Whether the method has no objective without labeled images."""
        return self.objective_uses_labels or not (self.global_views or self.local_views)

    def objective(self, views: Views) -> dict[str, Tensor]:
        """The method's own loss on the unlabeled views: ``{"loss": total, name: term, ...}``
        (every entry is logged). A method without unlabeled views has none."""
        if self.global_views or self.local_views:
            raise ConfigError(
                f"method {type(self).__name__} loads unlabeled views but defines no objective(views) (docs/plugins.md)"
            )
        return {}

    def project(self, features: Tensor) -> Tensor:
        """The embedding of backbone ``features`` that SuNCEt compares (the method's projection)."""
        raise ConfigError(
            f"method {type(self).__name__} defines no project(features) for the labeled term "
            f"'{self.labeled_term.name if self.labeled_term is not None else ''}' to compare; define it, "
            "or use --label-loss ce"
        )

    def objective_with_suncet(
        self, views: Views, labeled_features: Tensor, labels: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Hook for a method that computes ``objective(views)`` and the SuNCEt term of the labeled
        images in one fused launch: returns (the objective's terms, the SuNCEt term). The default
        computes the two apart."""
        return self.objective(views), self.labeled_term(self, labeled_features, labels)

    def encode(self, images: Tensor) -> Tensor:
        """Backbone features of a batch of images (one pass: BatchNorm sees them together)."""
        return self.backbone(images)

    def evaluated_backbone(self) -> nn.Module:
        """The network that evaluation (kNN, linear probe, snn, fine-tuning), the training
        monitors and export use: ``self.backbone``. A teacher-student method returns its teacher
        here; it must be a submodule of the method built like ``self.backbone`` (same plugin and
        options: export describes it as that backbone)."""
        return self.backbone

    def forward(self, batch: data_batch.TrainBatch) -> dict[str, Tensor]:
        """The step's loss terms: the objective's, the labeled term, and their total ``loss``."""
        labeled = batch.labeled
        images = [*batch.global_views] + ([labeled] if labeled is not None else [])
        features = self.encode(torch.cat(images)) if images else None
        unlabeled_rows = sum(v.shape[0] for v in batch.global_views)
        labeled_features = features[unlabeled_rows:] if labeled is not None else None
        own_labels = self.objective_uses_labels and labeled is not None
        views = Views(
            batch.global_views,
            features[:unlabeled_rows] if features is not None else None,
            batch.local_views,
            batch.epoch,
            batch.step,
            labeled_features if own_labels else None,
            batch.labels if own_labels else None,
        )
        term = self.labeled_term if labeled is not None else None
        if term is None:
            return self._with_total(self.objective(views))
        terms, value = term.with_objective(self, views, labeled_features, batch.labels)
        if term.name in terms:
            raise ConfigError(
                f"method {type(self).__name__}'s objective returns a '{term.name}' term, which the labeled term adds"
            )
        total = self._with_total(terms, term.weight * value)
        return {**total, term.name: value}

    def _with_total(self, terms: dict[str, Tensor], labeled: Tensor | None = None) -> dict[str, Tensor]:
        """The objective's ``terms`` with ``loss``: their own total plus the weighted labeled term."""
        own = terms.get("loss")
        if own is None and (labeled is None or self.global_views or self.local_views):
            raise ConfigError(
                f"method {type(self).__name__}'s objective returns no 'loss' (its total; got "
                f"{', '.join(sorted(terms)) or 'no terms'}): return {{'loss': total, ...}} (docs/plugins.md)"
            )
        total = labeled if own is None else own if labeled is None else own + labeled
        return {**terms, "loss": total}

    def wants_labeled(self, epoch: int) -> bool:
        """Whether ``epoch``'s steps load a labeled batch: while the labeled term is on, or always
        for a method whose objective uses the labels."""
        if self.needs_labels:
            return True
        return self.labeled_term is not None and self.labeled_term.active(epoch)

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step with the run's 0-based global step of that update
        (SwAV re-normalises its prototypes here); not on a step --skip-nonfinite skips."""

    def rank_state(self) -> dict[str, Tensor]:
        """State that differs between ranks under DDP (SwAV's queue): saved for every rank."""
        return {}

    def load_rank_state(self, state: dict[str, Tensor]) -> None:
        """Restore what ``rank_state`` returned on this rank."""


def check_method(method_cls: type[Method], term: LabeledTerm | None, train: TrainConfig) -> None:
    """What the settings may not ask of a method, and what a plugin of the earlier contract
    cannot honour: one ConfigError line naming the method."""
    name, default_term = method_cls.__name__, TrainConfig.label_loss
    if method_cls.objective_uses_labels and (term is not None or train.label_loss != default_term):
        raise ConfigError(f"method {name} uses the labels in its own objective; --label-loss does not apply to it")
    if method_cls.objective_uses_labels or not (method_cls.global_views or method_cls.local_views):
        if train.suncet_weight == 0:
            raise ConfigError(f"method {name} trains on labeled images, but --suncet-weight 0 turns them off")
        if train.suncet_epochs is not None and train.suncet_epochs < train.epochs:
            raise ConfigError(
                f"method {name} trains on labeled images in every epoch; --suncet-epochs cannot stop them"
            )
    # A plugin of the earlier contract is known by its own forward(batch), which returns the whole
    # loss with the SuNCEt term it adds itself.
    if method_cls.forward is not Method.forward:
        contract = "implement objective(views) and let suncet.methods.Method add the labeled term (docs/plugins.md)"
        if term is not None and train.label_loss != default_term:
            raise ConfigError(
                f"method {name} overrides forward() and adds its labeled term itself, so it may ignore "
                f"--label-loss {train.label_loss}; {contract}"
            )
        warnings.warn(
            f"method {name} overrides forward() (the earlier method contract); {contract}", FutureWarning, stacklevel=4
        )


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
        name: option_value(f"method {owner}", name, value, hints.get(name), known[name].default)
        for name, value in values.items()
    }
    return options_cls(**converted)


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear - ReLU - Linear, the paper's projection head."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def forward_in_one_pass(backbone: nn.Module, head: nn.Module, parts: list[Tensor]) -> list[Tensor]:
    """Deprecated (Method.forward runs the one backbone pass): same-resolution parts through
    backbone and head as one batch."""
    warnings.warn(
        "suncet.methods.forward_in_one_pass is deprecated: Method.forward encodes the large crops and the "
        "labeled images in one pass (docs/plugins.md)",
        DeprecationWarning,
        stacklevel=2,
    )
    sizes = [p.shape[0] for p in parts]
    out = head(backbone(torch.cat(parts)))
    return list(out.split(sizes))


def __getattr__(name: str):
    if name == "TrainBatch":  # where earlier docs showed it; it lives with the data path now
        warnings.warn(
            "suncet.methods.TrainBatch moved to suncet.data.TrainBatch; the old path goes in suncet 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return data_batch.TrainBatch
    raise AttributeError(f"module 'suncet.methods' has no attribute {name!r}")
