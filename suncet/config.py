"""Training configuration: one flat dataclass, filled from defaults < preset < YAML file < flags."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from suncet.errors import ConfigError
from suncet.kernels import BACKENDS
from suncet.data.labels import parse_label_spec


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
    dataset_options: dict[str, Any] = setting(help="Dataset option, e.g. size=256 (repeatable).", flag="--dataset-opt", factory=dict)
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
    suncet_weight: float = setting(1.0, "Weight of the SuNCEt term (0: off).")
    suncet_epochs: int | None = setting(None, "Epoch after which SuNCEt is switched off (default: never).")
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
    warmup_epochs: float = setting(2.0, "Linear warm-up length in epochs.")
    weight_decay: float = setting(1e-5, "Weight decay (not applied to biases and norms).")
    momentum: float = setting(0.9, "Momentum.")
    # machinery
    backend: str = setting("auto", "Contrastive-loss backend: auto, cpu, triton, cuda, reference.")
    compile: str = setting(
        "none", "Run the step under torch.compile: none, default, or reduce-overhead (CUDA graphs on GPUs)."
    )
    sync_every: int = setting(
        1, "Steps between host synchronisations (loss terms, NaN check, stop requests); more lets a GPU run ahead."
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
    final_eval: str = setting("linear", "Evaluation after training: linear, knn, finetune or none.")
    loggers: list[str] = setting(
        help="Logger plugin besides metrics.csv, e.g. tensorboard (repeatable).", flag="--logger", factory=list
    )
    preset: str | None = setting(None, "Recipe preset: digits, cifar10, paper-imagenet-10pct.")


# Recipes, applied by name (--preset) or, without one, by dataset name. "digits" is tuned for
# 2 CPU cores; "paper-imagenet-10pct" carries method.md's values.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        "backbone": "small_resnet",
        "epochs": 200,
        "batch_size": 128,
        "classes_per_step": 10,
        "images_per_class": 4,
        "proj_hidden": 512,
        # 8x8 digits give an easy instance task: a warm temperature keeps SimCLR from
        # separating every image and lets classes cluster (docs/data.md, Recipes).
        "tau": 0.5,
        "lr": 1.0,
        "warmup_epochs": 2,
        "weight_decay": 1e-5,
        # A preset's options for one method only (other methods would reject them).
        "method_defaults": {"swav": {"local_crops": 2}},
    },
    "cifar10": {
        "dataset": "cifar10",
        "backbone": "resnet18",
        "epochs": 200,
        "batch_size": 256,
        "classes_per_step": 10,
        "images_per_class": 8,
        "proj_hidden": 2048,
        "lr": 1.2,
        "start_lr": 0.0,
        "warmup_epochs": 10,
        "weight_decay": 1e-6,
        "tau": 0.5,
    },
    "paper-imagenet-10pct": {
        "dataset": "imagefolder",
        "backbone": "resnet50",
        "labels": "10%",
        "epochs": 500,
        "suncet_epochs": 250,
        # per GPU (x 64 GPUs): 44 unlabeled x 2 views + 20 classes x 2 labeled
        "batch_size": 44,
        "classes_per_step": 20,
        "images_per_class": 2,
        "proj_hidden": 2048,
        "proj_dim": 128,
        "tau": 0.1,
        "optimizer": "lars",
        "optimizer_options": {"trust_coefficient": 0.001},
        "lr": 4.8,
        "start_lr": 0.6,
        "warmup_epochs": 10,
        "weight_decay": 1e-6,
        "momentum": 0.9,
        "monitor_every": 10,
        "final_eval": "finetune",
    },
}

FINAL_EVALS = ("linear", "knn", "finetune", "none")
COMPILE_MODES = ("none", "default", "reduce-overhead")
# device: uint8 batches augmented on the training device; workers: torchvision per image in loader processes
DATA_PIPELINES = ("device", "workers")


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _float_text(value: Any) -> float | None:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; such text is still a number to a user."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_type(key: str, value: Any) -> Any:
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
        if base is float and _float_text(value) is not None:
            return _float_text(value)
        if base is str and isinstance(value, str):
            return value
        if base is dict and isinstance(value, dict):
            return dict(value)
        if base is list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    names = " or ".join(getattr(typing.get_origin(k) or k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")


def load_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def build_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """defaults < preset (named in overrides or file, else the dataset's own) < file < overrides."""
    file_values = dict(file_values or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    known = config_fields()
    for source, values in (("config file", file_values), ("options", overrides)):
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown {source} key '{key}'; known keys: {', '.join(known)}")
    dataset = overrides.get("dataset", file_values.get("dataset", TrainConfig.dataset))
    preset = overrides.get("preset", file_values.get("preset"))
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; available: {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS.get(preset if preset is not None else dataset, {}))
    method_defaults = values.pop("method_defaults", {})
    values.update(file_values)
    values.update(overrides)
    values = {k: _check_type(k, v) for k, v in values.items()}
    method = values.get("method", TrainConfig.method)
    if method in method_defaults:
        values["method_options"] = {**method_defaults[method], **values.get("method_options", {})}
    config = TrainConfig(**values)
    validate(config)
    # Not a field: config.yaml and checkpoint comparisons hold settings, not where they came from.
    config._given = frozenset(file_values) | frozenset(overrides)
    return config


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


def validate(config: TrainConfig) -> None:
    """Range checks that need no plugin lookup (those are done when the run is assembled)."""

    def positive(name: str, allow_zero: bool = False) -> None:
        value = getattr(config, name)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    if not is_label_file(config.labels):
        parse_label_spec(config.labels)
    for name in ("epochs", "batch_size", "proj_hidden", "proj_dim", "lr", "tau", "knn_k", "keep_checkpoints", "sync_every"):
        positive(name)
    for name in ("suncet_weight", "weight_decay", "warmup_epochs", "start_lr", "final_lr", "monitor_every", "probe_every",
                 "skip_nonfinite", "label_seed", "seed", "num_workers"):
        positive(name, allow_zero=True)
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {config.momentum}")
    if config.suncet_epochs is not None and not 0 <= config.suncet_epochs <= config.epochs:
        raise ConfigError(f"suncet-epochs must be between 0 and epochs ({config.epochs}), got {config.suncet_epochs}")
    parse_every(config.checkpoint_every)
    if config.backend not in ("auto", *BACKENDS):
        raise ConfigError(f"unknown contrastive backend '{config.backend}'; choose one of auto, {', '.join(BACKENDS)}")
    if config.compile not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got '{config.compile}'")
    if config.data_pipeline not in DATA_PIPELINES:
        raise ConfigError(f"data-pipeline must be one of {', '.join(DATA_PIPELINES)}, got '{config.data_pipeline}'")
    if config.final_eval not in FINAL_EVALS:
        raise ConfigError(f"final-eval must be one of {', '.join(FINAL_EVALS)}, got '{config.final_eval}'")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{config.device}'")


def is_label_file(labels: str) -> bool:
    """``--labels`` names a subset file (a path, or a name with an extension) rather than a spec."""
    if re.fullmatch(r"-?[\d.]+%|-?\d+/class", labels.strip()):
        return False
    return "/" in labels or os.sep in labels or bool(re.search(r"\.[A-Za-z]\w*$", labels))


_EVERY = re.compile(r"^\s*(\d+)\s*(epochs?|steps?|min|minutes?)\s*$")


def parse_every(text: str) -> tuple[int, str]:
    """``'2epochs'``, ``'500steps'``, ``'10min'`` -> (count, unit) with unit epoch, step or min."""
    m = _EVERY.match(str(text))
    if not m or int(m.group(1)) < 1:
        raise ConfigError(
            f"checkpoint-every must be a positive count of epochs, steps or minutes (1epoch, 500steps, 10min), got {text!r}"
        )
    return int(m.group(1)), {"e": "epoch", "s": "step", "m": "min"}[m.group(2)[0]]


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def parse_key_values(pairs: tuple[str, ...] | list[str], option: str) -> dict[str, Any]:
    """``key=value`` strings to a dict, values read as YAML scalars (3000 -> int, true -> bool)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"{option} expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        number = _float_text(value)
        out[key.strip()] = number if number is not None and not str(value).isidentifier() else value
    return out
