"""Training settings: the schema (one flat dataclass whose fields are the CLI's flags), typed
values (the one coercion of settings, method options and plugin options), settings files, and the
checks of each value on its own.

A leaf: it imports nothing of the engine's. What needs more than the settings holds its rules:
presets and the configuration built from defaults < preset < file < flags are in
suncet/presets.py, learning rates scale in suncet/optim.py (once, after the batch is fitted to
the data: suncet/engine/fit.py), label specs, backends and checkpoint intervals are checked where
the run is assembled (suncet/engine/assemble.py, ``check_settings``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from suncet.errors import ConfigError, shown


def setting(default: Any = None, help: str = "", *, flag: str | None = None, factory: Any = None) -> Any:
    """A TrainConfig field with its command-line help: the CLI's flags are generated from these.

    ``flag`` names a dict field's repeatable ``KEY=VALUE`` flag (``--backbone-opt``) or a list
    field's repeatable flag (``--logger``); other fields get ``--field-name`` (``--x/--no-x`` for
    booleans).
    """
    metadata = {"help": help, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # what to train
    method: str = setting("simclr", "Method plugin (simclr, swav, supervised, ...).")
    dataset: str = setting("digits", "Dataset plugin (digits, cifar10, stl10, imagefolder, ...).")
    data: str | None = setting(None, "Dataset root directory, for datasets read from disk.")
    download: bool = setting(False, "Download the dataset if it is missing (where a network exists).")
    dataset_options: dict[str, Any] = setting(
        help="Dataset option, e.g. size=256 (imagefolder: cap on the short side) (repeatable).",
        flag="--dataset-opt",
        factory=dict,
    )
    labels: str = setting("10%", "Labeled subset: 10%, 1%, 0.5%, 0%, 100%, 4/class, or a file of training indices.")
    label_seed: int = setting(0, "Seed of the labeled-subset draw.")
    backbone: str = setting("small_resnet", "Backbone plugin (small_resnet, resnet18, resnet50, ...).")
    backbone_options: dict[str, Any] = setting(
        help="Backbone option (repeatable).", flag="--backbone-opt", factory=dict
    )
    method_options: dict[str, Any] = setting(help="Method option (repeatable).", flag="--method-opt", factory=dict)
    augment: dict[str, Any] = setting(
        help="Augmentation override, e.g. global_crop_scale=[0.3,1] (repeatable).", flag="--augment", factory=dict
    )
    proj_hidden: int = setting(2048, "Hidden width of the projection head.")
    proj_dim: int = setting(128, "Output width of the projection head.")
    tau: float = setting(0.1, "Temperature of the contrastive terms.")
    # SuNCEt
    suncet_weight: float = setting(1.0, "Weight of the labeled term, SuNCEt or cross-entropy (0: off).")
    suncet_epochs: int | None = setting(None, "Epoch after which the labeled term is switched off (default: never).")
    label_loss: str = setting(
        "suncet",
        "How labels enter pre-training (a label-loss plugin): suncet (supervised contrastive) or ce "
        "(cross-entropy through a linear classifier on the backbone features).",
    )
    classes_per_step: int = setting(10, "Classes in each step's labeled batch.")
    images_per_class: int = setting(4, "Labeled images per class in each step.")
    # schedule and optimisation
    epochs: int = setting(100, "Epochs (passes over the unlabeled images).")
    batch_size: int = setting(256, "Unlabeled images per step and process (each gives two views).")
    optimizer: str = setting("lars", "Optimizer plugin (lars, sgd, adamw).")
    optimizer_options: dict[str, Any] = setting(
        help="Optimizer option (repeatable).", flag="--optimizer-opt", factory=dict
    )
    lr: float = setting(1.0, "Peak learning rate.")
    start_lr: float = setting(0.0, "Learning rate at the start of the warm-up.")
    final_lr: float = setting(0.0, "Learning rate at the end of the cosine decay.")
    lr_batch: int | None = setting(
        None,
        "Global batch (processes x images per step, counted as --lr-batch-counts says) that lr, start-lr and "
        "final-lr are stated for: they scale linearly to the run's own (a preset's --lr-batch 256: per 256 images; an "
        "--lr you give without --lr-batch is the run's own).",
    )
    lr_batch_counts: str = setting(
        "unlabeled",
        "What --lr-batch counts: unlabeled (the unlabeled images of a step) or views (two per unlabeled "
        "image plus the labeled images: the paper's count).",
    )
    warmup_epochs: float = setting(2.0, "Linear warm-up length in epochs.")
    weight_decay: float = setting(1e-5, "Weight decay (not applied to biases and norms).")
    momentum: float = setting(0.9, "Momentum.")
    # machinery
    backend: str = setting("auto", "Contrastive-loss backend: auto, cpu, triton, cuda, reference.")
    compile: str = setting(
        "none", "Run the step under torch.compile: none, default, or reduce-overhead (CUDA graphs on GPUs)."
    )
    sync_every: int = setting(
        10,
        "Steps between host synchronisations (loss terms, NaN check, stop requests; also at each epoch's end "
        "and step checkpoint); more lets a GPU run ahead. A NaN is still reported with its own step.",
    )
    data_pipeline: str = setting(
        "device",
        "device (batched augmentation on the training device) or workers (torchvision per image in loader processes).",
    )
    num_workers: int = setting(4, "Loader processes for --data-pipeline workers.")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.")
    seed: int = setting(0, "Seed of initialisation, sampling and augmentation.")
    deterministic: bool = setting(False, "Ask torch for deterministic algorithms.")
    sync_bn: bool = setting(False, "Synchronise BatchNorm statistics across GPUs.")
    detach_remote_keys: bool = setting(
        False, "Other ranks' embeddings carry no gradient (the reference code's objective, for parity)."
    )
    run_dir: str | None = setting(None, "Run directory (the --out flag).")
    checkpoint_every: str = setting("1epoch", "Checkpoint interval: 1epoch, 500steps, 10min.")
    keep_checkpoints: int = setting(2, "Numbered checkpoints kept besides last.pt.")
    skip_nonfinite: int = setting(0, "Skip up to N steps with a NaN/inf loss instead of stopping (checks every step).")
    knn_k: int = setting(20, "Neighbours of the kNN monitor.")
    monitor_every: int = setting(1, "Epochs between kNN monitors (0: off).")
    probe_every: int = setting(0, "Epochs between linear-probe monitors (0: off).")
    final_eval: str = setting("linear", "Evaluation after training: linear, knn, snn, finetune or none.")
    loggers: list[str] = setting(
        help="Logger plugin besides metrics.csv, e.g. tensorboard (repeatable).", flag="--logger", factory=list
    )
    preset: str | None = setting(
        None,
        "Recipe preset (suncet plugins lists them): digits, cifar10, paper-imagenet-10pct, paper-imagenet-1pct, "
        "paper-swav-imagenet-10pct, paper-cifar10, ... (docs/recipes.md); by default the method's preset for the "
        "dataset (<method>-<dataset>), else the dataset's own.",
    )


FINAL_EVALS = ("linear", "knn", "snn", "finetune", "none")
COMPILE_MODES = ("none", "default", "reduce-overhead")
# device: uint8 batches augmented on the training device; workers: torchvision per image in loader processes
DATA_PIPELINES = ("device", "workers")
# What a global batch counts for learning-rate scaling: the unlabeled images of a step, or its
# views (two per unlabeled image, plus one per labeled image while the labeled term is on).
LR_BATCH_COUNTS = ("unlabeled", "views")
RATES = ("lr", "start_lr", "final_lr")


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


_FIELD_TYPES = typing.get_type_hints(TrainConfig)


# ---------------------------------------------------------------------------------------------
# Typed values: settings, method options and plugin options are coerced by these rules alone.

INT64_MAX = 2**63 - 1


class NotOfType(ValueError):
    """A value that does not read as the declared type; ``expected`` names it for a message."""

    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


@dataclass(frozen=True)
class Range:
    """A numeric option's allowed interval, declared as ``Annotated[float, Range(0, 1)]``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the option must be greater than ``low``

    def describe(self) -> str:
        parts = [f"{'>' if self.low_open else '>='} {self.low}"] if self.low is not None else []
        return " and ".join(parts + ([f"<= {self.high}"] if self.high is not None else []))

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)


def typed(value: Any, annotation: Any, default: Any = None) -> Any:
    """``value`` as a value of ``annotation`` (bool, int, float, str, dict, list[str], ``X | None``,
    ``Annotated[X, ...]``; unannotated: the type of ``default``) where that is unambiguous, else
    NotOfType. Only the type is checked here: ranges and finiteness are the value checks of
    whoever declares the value."""
    annotation = _without_metadata(annotation)
    if annotation is None or annotation is inspect.Parameter.empty or annotation is Any:
        annotation = type(default) if default is not None else type(value)
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    allowed = typing.get_args(annotation) if union else (annotation,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is not type(None):
            converted = _as_kind(value, kind)
            if converted is not None:
                return converted
    raise NotOfType(" or ".join(_type_name(k) for k in allowed))


def _without_metadata(annotation: Any) -> Any:
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation


def _type_name(kind: Any) -> str:
    return getattr(typing.get_origin(kind) or kind, "__name__", str(kind))


def _as_kind(value: Any, kind: Any) -> Any:
    """``value`` as a ``kind``, or None."""
    base = typing.get_origin(kind) or kind
    if base is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if base is int:
        return (
            value if isinstance(value, int) else int(value) if isinstance(value, float) and value.is_integer() else None
        )
    if base is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as text; to a user it is a number
            try:
                return float(value)
            except ValueError:
                return None
        return float(value) if isinstance(value, (int, float)) else None
    if base is str:
        return str(value) if isinstance(value, (str, int, float)) else None
    if base is dict:
        return dict(value) if isinstance(value, dict) else None
    if base is list:
        items = typing.get_args(kind)
        if isinstance(value, (list, tuple)) and all(isinstance(v, items[0] if items else object) for v in value):
            return list(value)
        return None
    return value if isinstance(base, type) and isinstance(value, base) else None


def option_value(owner: str, name: str, value: Any, annotation: Any, default: Any) -> Any:
    """``value`` as option ``name`` of ``owner`` (a method's Options field, a plugin's keyword
    argument) takes it: of its type (``typed``), numbers finite and within int64, in any declared
    ``Range``; else one ConfigError line."""
    if value is None and default is None:
        return None
    ranges = [m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, Range)]
    try:
        converted = typed(value, annotation, default)
    except NotOfType as exc:
        floating = exc.expected == "float"
        raise ConfigError(
            f"option {name} of {owner} must be {'a finite ' if floating else ''}{exc.expected}, got {shown(value)}"
        ) from None
    if isinstance(converted, float) and not math.isfinite(converted):
        raise ConfigError(f"option {name} of {owner} must be a finite float, got {shown(value)}")
    if isinstance(converted, int) and not isinstance(converted, bool) and abs(converted) > INT64_MAX:
        raise ConfigError(f"option {name} of {owner} must be int (within int64), got {shown(value)}")
    for declared in ranges:
        if not declared.holds(converted):
            raise ConfigError(f"option {name} of {owner} must be {declared.describe()}, got {shown(value)}")
    return converted


def setting_value(key: str, value: Any, source: str | None = None) -> Any:
    """``value`` as setting ``key`` takes it (``typed``); else one ConfigError line naming ``source``."""
    try:
        return typed(value, _FIELD_TYPES[key])
    except NotOfType as exc:
        origin = f" (from {source})" if source else ""
        raise ConfigError(f"config key '{key}' must be {exc.expected}, got {shown(value)}{origin}") from None


MAX_YAML_BYTES = 1 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a mapping that names a key twice (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base loader says so
                break
            if repeated:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, key, line):
        super().__init__(key, line)
        self.key, self.line = key, line


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file of settings: a regular file of at most 1 MiB of UTF-8 text, loaded safely (no
    Python objects, no key given twice)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; name a YAML file of settings")
    if not path.is_file():
        raise ConfigError(
            f"config file {path} is not a regular file (a pipe or a device?); name a YAML file of settings"
        )
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"config file {path} is {path.stat().st_size:,} bytes; a settings file is at most 1 MiB")
    try:
        data = yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except _DuplicateKey as exc:
        raise ConfigError(
            f"config file {path} sets {shown(exc.key)} twice (again on line {exc.line}); keep one"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def renamed_keys(values: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration with the keys of older versions under their current names."""
    values = dict(values)
    if "kernel" in values and "backend" not in values:  # the contrastive backend's key before 0.2
        values["backend"] = values.pop("kernel")
    return values


def config_from_saved(values: dict[str, Any], source: Path) -> TrainConfig:
    """A run's saved configuration, read back as it was written: no preset is applied again."""
    known = config_fields()
    values = renamed_keys(values)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{unknown[0]}' (written by another version of suncet?)")
    config = TrainConfig(**{k: setting_value(k, v) for k, v in values.items()})
    validate(config)
    return config


_POSITIVE = (
    "epochs",
    "batch_size",
    "proj_hidden",
    "proj_dim",
    "lr",
    "tau",
    "knn_k",
    "keep_checkpoints",
    "sync_every",
    "classes_per_step",
    "images_per_class",
)
_NON_NEGATIVE = (
    "suncet_weight",
    "weight_decay",
    "warmup_epochs",
    "start_lr",
    "final_lr",
    "monitor_every",
    "probe_every",
    "skip_nonfinite",
    "label_seed",
    "seed",
    "num_workers",
)
_CHOICES = {
    "compile": COMPILE_MODES,
    "data_pipeline": DATA_PIPELINES,
    "final_eval": FINAL_EVALS,
    "lr_batch_counts": LR_BATCH_COUNTS,
}


def validate(config: TrainConfig, sources: dict[str, str] | None = None) -> None:
    """Every setting of its type and in range, every number finite, before anything is written
    or launched.

    ``sources`` names where each setting came from (preset, config file, flag), for the message;
    what needs more than the settings (plugin names and options, label specs, backends) is
    checked when the run is assembled, before any file is written.
    """
    sources = sources or {}
    for name in _FIELD_TYPES:
        setting_value(name, getattr(config, name), sources.get(name))

    def refuse(name: str, allowed: str) -> None:
        origin = f" (from {sources[name]})" if name in sources else ""
        raise ConfigError(f"{name.replace('_', '-')} must be {allowed}, got {shown(getattr(config, name))}{origin}")

    for name in _POSITIVE + _NON_NEGATIVE:
        value, floating = getattr(config, name), _FIELD_TYPES[name] is float
        rule = ("> 0" if name in _POSITIVE else ">= 0") + (" and finite" if floating else f" and at most {INT64_MAX}")
        if not (value > 0 if name in _POSITIVE else value >= 0) or not (
            math.isfinite(value) if floating else value <= INT64_MAX
        ):
            refuse(name, rule)
    if not 0 <= config.momentum < 1:
        refuse("momentum", "in [0, 1)")
    if config.suncet_epochs is not None and not 0 <= config.suncet_epochs <= config.epochs:
        refuse("suncet_epochs", f"between 0 and epochs ({config.epochs})")
    if config.lr_batch is not None and not 1 <= config.lr_batch <= INT64_MAX:
        refuse("lr_batch", "a positive integer")
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            refuse(name, f"one of {', '.join(choices)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", config.device):
        refuse("device", "auto, cpu, cuda or cuda:N")


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
