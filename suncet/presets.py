"""A run's settings from their sources: defaults < preset < YAML file < flags (or keyword arguments).

A preset is a plugin (``suncet.presets`` entry points; plugins/presets/ holds the built-in ones):
the one named with ``preset``, else the default of the method on the dataset (a preset named
``<method>-<dataset>``, such as ``dino-digits``), else the dataset's own (a preset named after the
dataset). The configuration records the preset it applied. Learning rates are left as the sources state them:
a run scales them once, after its batch is fitted to the data (suncet/engine/fit.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from suncet.config import TrainConfig, config_fields, setting_value, validate
from suncet.errors import ConfigError, shown
from suncet.registry import PRESETS, plugin_code


def build_config(
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    file_name: str | Path | None = None,
    given_by: str = "flag",
) -> TrainConfig:
    """defaults < preset (named in overrides or file, else the method's on the dataset, else the
    dataset's own) < file < overrides
    (None values count as not given), checked.

    ``file_name`` and ``given_by`` ("flag": --name, or "argument") name the sources in errors.
    """
    file_values = dict(file_values or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for source, values in (("config file", file_values), ("options", overrides)):
        _check_keys(values, source)
    dataset = overrides.get("dataset", file_values.get("dataset", TrainConfig.dataset))
    preset = overrides.get("preset", file_values.get("preset"))
    method = overrides.get("method", file_values.get("method", TrainConfig.method))
    values, preset_name = _preset_values(preset, dataset, method)
    method_defaults = values.pop("method_defaults", {})
    sources = {k: f"preset {preset_name}" for k in values}
    sources.update({k: f"config file {file_name}" if file_name else "config file" for k in file_values})
    sources.update({k: f"--{k.replace('_', '-')}" if given_by == "flag" else f"argument {k}" for k in overrides})
    values.update(file_values)
    values.update(overrides)
    values = {k: setting_value(k, v, sources.get(k)) for k, v in values.items()}
    method = values.get("method", TrainConfig.method)
    if method in method_defaults:
        values["method_options"] = {**method_defaults[method], **values.get("method_options", {})}
    config = TrainConfig(**{**values, "preset": preset_name})
    validate(config, sources)
    return config


def given_keys(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> frozenset[str]:
    """The settings a user gave to ``build_config`` (a file's keys, overrides that are not None):
    a run keeps them as given where it would fit or scale a default (suncet/engine/fit.py)."""
    return frozenset(file_values or {}) | frozenset(k for k, v in (overrides or {}).items() if v is not None)


def _check_keys(values: dict[str, Any], source: str) -> None:
    known = config_fields()
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown {source} key {shown(key)}; known keys: {', '.join(known)}")


def _preset_values(preset: Any, dataset: Any, method: Any) -> tuple[dict[str, Any], str | None]:
    """The settings of the preset named, else of the method's preset for the dataset, else of the
    dataset's own preset (none: no settings)."""
    if preset is None:
        if not isinstance(dataset, str):
            return {}, None
        defaults = [f"{method}-{dataset}"] if isinstance(method, str) else []
        preset = next((name for name in (*defaults, dataset) if name in PRESETS), None)
        if preset is None:
            return {}, None
    elif not isinstance(preset, str):
        raise ConfigError(f"unknown preset {shown(preset)}; available: {', '.join(PRESETS.names())}")
    info = PRESETS.get(preset)
    with plugin_code(info):
        values = info.obj()
    if not isinstance(values, dict):
        raise ConfigError(
            f"preset '{preset}' from package '{info.source}' returned {type(values).__name__}, not a dict of settings"
        )
    values = dict(values)
    method_defaults = values.pop("method_defaults", {})
    _check_keys(values, f"preset '{preset}' (package '{info.source}')")
    return {**values, "method_defaults": method_defaults}, preset
