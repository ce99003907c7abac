"""Training settings: the schema (one flat dataclass whose fields are the CLI's flags), how a
configuration is built from defaults < preset < YAML file < flags, and its validation.

What uses a setting holds its rules: presets are plugins (suncet/registry.py, plugins/presets/),
learning rates scale in suncet/optim.py, label specs parse in suncet/data/labels.py, checkpoint
intervals in suncet/engine/state.py, KEY=VALUE flags in cli/train.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from suncet.data.labels import is_label_file, parse_label_spec
from suncet.distributed import world_size_from_environment
from suncet.errors import ConfigError, shown
from suncet.kernels import BACKENDS
from suncet.optim import LR_BATCH_COUNTS, RATES, scale_learning_rates
from suncet.registry import PRESETS


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
        help="Dataset option, e.g. size=256 (imagefolder: cap on the short side) (repeatable).", flag="--dataset-opt", factory=dict
    )
    labels: str = setting("10%", "Labeled subset: 10%, 1%, 0.5%, 0%, 100%, 4/class, or a file of training indices.")
    label_seed: int = setting(0, "Seed of the labeled-subset draw.")
    backbone: str = setting("small_resnet", "Backbone plugin (small_resnet, resnet18, resnet50, ...).")
    backbone_options: dict[str, Any] = setting(help="Backbone option (repeatable).", flag="--backbone-opt", factory=dict)
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
        "suncet", "How labels enter pre-training: suncet (supervised contrastive) or ce (cross-entropy through a "
        "linear classifier on the backbone features)."
    )
    classes_per_step: int = setting(10, "Classes in each step's labeled batch.")
    images_per_class: int = setting(4, "Labeled images per class in each step.")
    # schedule and optimisation
    epochs: int = setting(100, "Epochs (passes over the unlabeled images).")
    batch_size: int = setting(256, "Unlabeled images per step and process (each gives two views).")
    optimizer: str = setting("lars", "Optimizer plugin (lars, sgd, adamw).")
    optimizer_options: dict[str, Any] = setting(help="Optimizer option (repeatable).", flag="--optimizer-opt", factory=dict)
    lr: float = setting(1.0, "Peak learning rate.")
    start_lr: float = setting(0.0, "Learning rate at the start of the warm-up.")
    final_lr: float = setting(0.0, "Learning rate at the end of the cosine decay.")
    lr_batch: int | None = setting(
        None, "Global batch (processes x images per step, counted as --lr-batch-counts says) that lr, start-lr and "
        "final-lr are stated for: they scale linearly to the run's own (a preset's --lr-batch 256: per 256 images; an "
        "--lr you give without --lr-batch is the run's own)."
    )
    lr_batch_counts: str = setting(
        "unlabeled", "What --lr-batch counts: unlabeled (the unlabeled images of a step) or views (two per unlabeled "
        "image plus the labeled images: the paper's count)."
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
        10, "Steps between host synchronisations (loss terms, NaN check, stop requests; also at each epoch's end "
        "and step checkpoint); more lets a GPU run ahead. A NaN is still reported with its own step."
    )
    data_pipeline: str = setting(
        "device", "device (batched augmentation on the training device) or workers (torchvision per image in loader processes)."
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
        None, "Recipe preset (suncet plugins lists them): digits, cifar10, paper-imagenet-10pct, paper-imagenet-1pct, "
        "paper-swav-imagenet-10pct, paper-cifar10, ... (docs/recipes.md); a dataset's own preset applies by default."
    )


FINAL_EVALS = ("linear", "knn", "snn", "finetune", "none")
LABEL_LOSSES = ("suncet", "ce")
COMPILE_MODES = ("none", "default", "reduce-overhead")
# device: uint8 batches augmented on the training device; workers: torchvision per image in loader processes
DATA_PIPELINES = ("device", "workers")


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def yaml_number(value: Any) -> float | None:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; such text is still a number to a user."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_type(key: str, value: Any, source: str | None = None) -> Any:
    """Coerce ``value`` to the field's type where it is unambiguous; else a ConfigError."""
    expected = _FIELD_TYPES[key]
    origin = typing.get_origin(expected)
    allowed = typing.get_args(expected) if origin in (typing.Union, types.UnionType) else (expected,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        base = typing.get_origin(kind) or kind
        if base is bool:
            if isinstance(value, bool):
                return value
            continue
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and yaml_number(value) is not None:
            return yaml_number(value)
        if base is str and isinstance(value, str):
            return value
        if base is dict and isinstance(value, dict):
            return dict(value)
        if base is list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    names = " or ".join(getattr(typing.get_origin(k) or k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"config key '{key}' must be {names}, got {shown(value)}" + (f" (from {source})" if source else ""))


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
        raise ConfigError(f"config file {path} is not a regular file (a pipe or a device?); name a YAML file of settings")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"config file {path} is {path.stat().st_size:,} bytes; a settings file is at most 1 MiB")
    try:
        data = yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"config file {path} sets {shown(exc.key)} twice (again on line {exc.line}); keep one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def build_config(
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    world_size: int | None = None,
    *,
    file_name: str | Path | None = None,
    given_by: str = "flag",
) -> TrainConfig:
    """defaults < preset (named in overrides or file, else the dataset's own) < file < overrides,
    with learning rates scaled to the global batch of ``world_size`` processes (default: torchrun's).

    ``file_name`` and ``given_by`` ("flag": --name, or "argument") name the sources in errors.
    """
    file_values = dict(file_values or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for source, values in (("config file", file_values), ("options", overrides)):
        _check_keys(values, source)
    dataset = overrides.get("dataset", file_values.get("dataset", TrainConfig.dataset))
    preset = overrides.get("preset", file_values.get("preset"))
    values, preset_name = _preset_values(preset, dataset)
    method_defaults = values.pop("method_defaults", {})
    sources = {k: f"preset {preset_name}" for k in values}
    sources.update({k: f"config file {file_name}" if file_name else "config file" for k in file_values})
    sources.update({k: f"--{k.replace('_', '-')}" if given_by == "flag" else f"argument {k}" for k in overrides})
    values.update(file_values)
    values.update(overrides)
    values = {k: _check_type(k, v, sources.get(k)) for k, v in values.items()}
    method = values.get("method", TrainConfig.method)
    if method in method_defaults:
        values["method_options"] = {**method_defaults[method], **values.get("method_options", {})}
    config = TrainConfig(**values)
    validate(config, sources)
    given = frozenset(file_values) | frozenset(overrides)
    config = scale_learning_rates(
        config, world_size or world_size_from_environment(), keep=frozenset() if "lr_batch" in given else given & set(RATES)
    )
    # Not a field: config.yaml and checkpoint comparisons hold settings, not where they came from.
    config._given = given
    return config


def _check_keys(values: dict[str, Any], source: str) -> None:
    known = config_fields()
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown {source} key {shown(key)}; known keys: {', '.join(known)}")


def _preset_values(preset: Any, dataset: Any) -> tuple[dict[str, Any], str | None]:
    """The settings of the preset named, else of the dataset's own preset (none: no settings)."""
    if preset is None:
        if not isinstance(dataset, str) or dataset not in PRESETS:
            return {}, None
        preset = dataset
    elif not isinstance(preset, str):
        raise ConfigError(f"unknown preset {shown(preset)}; available: {', '.join(PRESETS.names())}")
    info = PRESETS.get(preset)
    values = info.obj()
    if not isinstance(values, dict):
        raise ConfigError(f"preset '{preset}' from package '{info.source}' returned {type(values).__name__}, not a dict of settings")
    values = dict(values)
    method_defaults = values.pop("method_defaults", {})
    _check_keys(values, f"preset '{preset}' (package '{info.source}')")
    return {**values, "method_defaults": method_defaults}, preset


def given_settings(config: TrainConfig) -> frozenset[str]:
    """The settings the user gave (file, flags or keywords) to build_config; none for any other
    config (read back from a run, built by hand, or copied with dataclasses.replace)."""
    return getattr(config, "_given", frozenset())


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
    config = TrainConfig(**{k: _check_type(k, v) for k, v in values.items()})
    validate(config)
    return config


INT64_MAX = 2**63 - 1
_POSITIVE = ("epochs", "batch_size", "proj_hidden", "proj_dim", "lr", "tau", "knn_k", "keep_checkpoints", "sync_every",
             "classes_per_step", "images_per_class")
_NON_NEGATIVE = ("suncet_weight", "weight_decay", "warmup_epochs", "start_lr", "final_lr", "monitor_every", "probe_every",
                 "skip_nonfinite", "label_seed", "seed", "num_workers")
_CHOICES = {
    "compile": COMPILE_MODES, "data_pipeline": DATA_PIPELINES, "label_loss": LABEL_LOSSES, "final_eval": FINAL_EVALS,
    "lr_batch_counts": LR_BATCH_COUNTS,
}


def validate(config: TrainConfig, sources: dict[str, str] | None = None) -> None:
    """Every setting in range, every number finite, before anything is written or launched.

    ``sources`` names where each setting came from (preset, config file, flag), for the message;
    plugin names and options are checked when the run is assembled, before any file is written.
    """
    sources = sources or {}

    def refuse(name: str, allowed: str) -> None:
        origin = f" (from {sources[name]})" if name in sources else ""
        raise ConfigError(f"{name.replace('_', '-')} must be {allowed}, got {shown(getattr(config, name))}{origin}")

    for name in _POSITIVE + _NON_NEGATIVE:
        value, floating = getattr(config, name), _FIELD_TYPES[name] is float
        rule = ("> 0" if name in _POSITIVE else ">= 0") + (" and finite" if floating else f" and at most {INT64_MAX}")
        if not (value > 0 if name in _POSITIVE else value >= 0) or not (math.isfinite(value) if floating else value <= INT64_MAX):
            refuse(name, rule)
    if not 0 <= config.momentum < 1:
        refuse("momentum", "in [0, 1)")
    if config.suncet_epochs is not None and not 0 <= config.suncet_epochs <= config.epochs:
        refuse("suncet_epochs", f"between 0 and epochs ({config.epochs})")
    if config.lr_batch is not None and not 1 <= config.lr_batch <= INT64_MAX:
        refuse("lr_batch", "a positive integer")
    if not is_label_file(config.labels):
        parse_label_spec(config.labels)
    if config.backend not in ("auto", *BACKENDS):
        raise ConfigError(f"unknown contrastive backend {shown(config.backend)}; choose one of auto, {', '.join(BACKENDS)}")
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            refuse(name, f"one of {', '.join(choices)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", config.device):
        refuse("device", "auto, cpu, cuda or cuda:N")


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


