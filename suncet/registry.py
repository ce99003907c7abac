"""Plugin registry for methods, datasets, backbones, optimizers, loggers and presets.

In-tree code registers with a decorator (``@register_method("simclr")``). Packages, the
built-in ``suncet.plugins`` included, announce plugins through entry points in the groups
``suncet.methods``, ``suncet.datasets``, ``suncet.backbones``, ``suncet.optimizers``,
``suncet.loggers`` and ``suncet.presets``; a group is loaded the first time its registry is looked up. An entry point
may name a module whose import runs the decorators, or a single object, registered under the
entry point's name.
"""

from __future__ import annotations

import contextvars
import importlib.metadata as metadata
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from suncet.errors import ConfigError, SuncetError, shown

__all__ = [
    "BACKBONES",
    "DATASETS",
    "LOGGERS",
    "METHODS",
    "OPTIMIZERS",
    "PRESETS",
    "REGISTRIES",
    "DuplicatePluginError",
    "PluginError",
    "PluginImportError",
    "PluginInfo",
    "Registry",
    "UnknownPluginError",
    "register_backbone",
    "register_dataset",
    "register_logger",
    "register_method",
    "register_optimizer",
    "register_preset",
]


class PluginError(SuncetError):
    """A plugin could not be found, loaded or registered."""


class UnknownPluginError(PluginError):
    exit_code = 2


class DuplicatePluginError(PluginError):
    pass


class PluginImportError(PluginError):
    pass


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    obj: Any
    source: str
    description: str

    @property
    def target(self) -> str:
        return f"{getattr(self.obj, '__module__', '?')}.{getattr(self.obj, '__qualname__', repr(self.obj))}"


@dataclass(frozen=True)
class PluginFailure:
    kind: str
    entry_point: str
    value: str
    source: str
    error: str


# The distribution whose entry point is being imported, so decorators that run during
# that import credit the right package.
_loading_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("_loading_source", default=None)


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _source_of(obj: Any) -> str:
    loading = _loading_source.get()
    if loading is not None:
        return loading
    top = (getattr(obj, "__module__", None) or "?").split(".")[0]
    dists = metadata.packages_distributions().get(top)
    return dists[0] if dists else top


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


def checked_option(owner: str, name: str, value: Any, annotation: Any, default: Any) -> Any:
    """``value`` as option ``name`` of ``owner`` takes it (int, float, bool, str, or None where
    allowed): numbers finite and in any declared ``Range``; else one ConfigError line."""
    ranges = [m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, Range)]
    base = typing.get_args(annotation)[0] if ranges else annotation
    allowed = typing.get_args(base) if typing.get_origin(base) in (typing.Union, types.UnionType) else (base,)
    if base is None or base is inspect.Parameter.empty:
        allowed = (type(default),) if default is not None else (type(value),)
    kinds = [k for k in allowed if k is not type(None)]
    if value is None and (type(None) in allowed or default is None):
        return None
    kind = kinds[0] if kinds else type(value)
    converted = _convert(value, kind)
    if converted is None or (isinstance(converted, float) and not math.isfinite(converted)):
        raise ConfigError(f"option {name} of {owner} must be {'a finite ' if kind is float else ''}{kind.__name__}, got {shown(value)}")
    for declared in ranges:
        if not declared.holds(converted):
            raise ConfigError(f"option {name} of {owner} must be {declared.describe()}, got {shown(value)}")
    return converted


def _convert(value: Any, kind: type) -> Any:
    """``value`` as a ``kind`` where that is unambiguous, else None."""
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind is int:
        return value if isinstance(value, int) and abs(value) <= 2**63 - 1 else (
            int(value) if isinstance(value, float) and value.is_integer() else None)
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                return float(value)
            except ValueError:
                return None
        return float(value) if isinstance(value, (int, float)) else None
    if kind is str:
        return str(value) if isinstance(value, (str, int, float)) else None
    return value if isinstance(value, kind) else None


class Registry:
    """Named plugins of one kind, filled by decorators and by an entry-point group."""

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._plugins: dict[str, PluginInfo] = {}
        self._failures: list[PluginFailure] = []
        self._conflicts: dict[str, str] = {}
        self._entry_points_loaded = False

    def register(self, name: str | None = None, *, description: str | None = None) -> Callable[[Any], Any]:
        """Decorator: register a class or factory under ``name`` (default: its own name)."""

        def decorator(obj: Any) -> Any:
            self.add(name or obj.__name__.lower(), obj, description=description)
            return obj

        return decorator

    def add(self, name: str, obj: Any, *, description: str | None = None, source: str | None = None) -> PluginInfo:
        info = PluginInfo(
            kind=self.kind,
            name=name,
            obj=obj,
            source=source or _source_of(obj),
            description=description if description is not None else _first_doc_line(obj),
        )
        existing = self._plugins.get(name)
        if existing is not None:
            if existing.target == info.target:
                return existing  # the same object seen again (module imported twice)
            # Remembered, so that looking the name up fails too instead of picking a winner.
            self._conflicts[name] = (
                f"{self.kind} plugin '{name}' is registered twice: by package '{existing.source}' "
                f"({existing.target}) and by package '{info.source}' ({info.target})"
            )
            if _loading_source.get() is not None:
                # Inside a package's entry point: its other plugins still register (raising here
                # would abort the import of that module, and every plugin after this one with it).
                return existing
            raise DuplicatePluginError(self._conflicts[name])
        self._plugins[name] = info
        return info

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in sorted(metadata.entry_points(group=self.group), key=lambda e: (e.dist.name if e.dist else "", e.name)):
            dist = ep.dist.name if ep.dist is not None else "?"
            token = _loading_source.set(dist)
            try:
                loaded = ep.load()
                if not isinstance(loaded, types.ModuleType):
                    self.add(ep.name, loaded, source=dist)
            except Exception as exc:  # any error inside third-party code is reported, never fatal here
                self._failures.append(
                    PluginFailure(self.kind, ep.name, ep.value, dist, f"{type(exc).__name__}: {exc}")
                )
            finally:
                _loading_source.reset(token)

    def get(self, name: str) -> PluginInfo:
        self._load_entry_points()
        if name in self._conflicts:
            raise DuplicatePluginError(self._conflicts[name])
        info = self._plugins.get(name)
        if info is not None:
            return info
        for failure in self._failures:
            if failure.entry_point == name:
                raise PluginImportError(
                    f"{self.kind} plugin '{name}' from package '{failure.source}' failed to import "
                    f"({failure.value}): {failure.error}"
                )
        message = f"unknown {self.kind} {shown(name)}; available: {', '.join(self.names()) or 'none'}"
        if self._failures:
            broken = "; ".join(f"'{f.entry_point}' from package '{f.source}': {f.error}" for f in self._failures)
            message += f" (plugins that failed to import: {broken})"
        raise UnknownPluginError(message)

    def check_options(self, name: str, options: dict[str, Any] | None, engine_args: tuple[str, ...] = ()) -> dict[str, Any]:
        """The user's ``options`` for plugin ``name``, each of a name it takes and of its declared
        type and range (``Annotated[float, Range(...)]``, else the default's type); else ConfigError."""
        info = self.get(name)
        options = dict(options or {})
        if not options:
            return options
        try:
            parameters = inspect.signature(info.obj).parameters
            hints = typing.get_type_hints(info.obj, include_extras=True)
        except (TypeError, ValueError, NameError):
            parameters, hints = {}, {}
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return options
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        accepted = {n: p for n, p in parameters.items() if p.kind in named and p.default is not inspect.Parameter.empty
                    and n not in engine_args}
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{self.kind} '{name}' has no option {shown(unknown[0])}; its options: {', '.join(accepted) or 'none'}"
            )
        owner = f"{self.kind} '{name}'"
        return {k: checked_option(owner, k, v, hints.get(k), accepted[k].default) for k, v in options.items()}

    def create(self, name: str, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Call plugin ``name`` with ``args``/``kwargs`` from the engine plus the user's checked ``options``."""
        options = self.check_options(name, options, tuple(kwargs))
        return self.get(name).obj(*args, **kwargs, **options)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._plugins)

    def infos(self) -> list[PluginInfo]:
        self._load_entry_points()
        return [self._plugins[n] for n in sorted(self._plugins)]

    def failures(self) -> list[PluginFailure]:
        self._load_entry_points()
        return list(self._failures)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._plugins


METHODS = Registry("method", "suncet.methods")
DATASETS = Registry("dataset", "suncet.datasets")
BACKBONES = Registry("backbone", "suncet.backbones")
OPTIMIZERS = Registry("optimizer", "suncet.optimizers")
LOGGERS = Registry("logger", "suncet.loggers")
PRESETS = Registry("preset", "suncet.presets")
REGISTRIES = {r.kind: r for r in (METHODS, DATASETS, BACKBONES, OPTIMIZERS, LOGGERS, PRESETS)}

register_method = METHODS.register
register_dataset = DATASETS.register
register_backbone = BACKBONES.register
register_optimizer = OPTIMIZERS.register
register_logger = LOGGERS.register
register_preset = PRESETS.register
