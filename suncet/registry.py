"""Plugin registry for methods, datasets, backbones, optimizers and loggers.

In-tree code registers with a decorator (``@register_method("simclr")``). Packages, the
built-in ``suncet.plugins`` included, announce plugins through entry points in the groups
``suncet.methods``, ``suncet.datasets``, ``suncet.backbones``, ``suncet.optimizers`` and
``suncet.loggers``; a group is loaded the first time its registry is looked up. An entry point
may name a module whose import runs the decorators, or a single object, registered under the
entry point's name.
"""

from __future__ import annotations

import contextvars
import importlib.metadata as metadata
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable

from suncet.errors import ConfigError, SuncetError

__all__ = [
    "BACKBONES",
    "DATASETS",
    "LOGGERS",
    "METHODS",
    "OPTIMIZERS",
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
        message = f"unknown {self.kind} '{name}'; available: {', '.join(self.names()) or 'none'}"
        if self._failures:
            broken = "; ".join(f"'{f.entry_point}' from package '{f.source}': {f.error}" for f in self._failures)
            message += f" (plugins that failed to import: {broken})"
        raise UnknownPluginError(message)

    def create(self, name: str, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Call plugin ``name`` with ``args``/``kwargs`` from the engine plus the user's ``options``,
        rejecting options the plugin does not take."""
        info = self.get(name)
        options = dict(options or {})
        if options:
            try:
                parameters = inspect.signature(info.obj).parameters
            except (TypeError, ValueError):
                parameters = {}
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
            named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            accepted = [n for n, p in list(parameters.items())[len(args):] if p.kind in named and n not in kwargs]
            unknown = sorted(set(options) - set(accepted))
            if unknown and not takes_any:
                raise ConfigError(
                    f"{self.kind} '{name}' has no option '{unknown[0]}'; its options: {', '.join(accepted) or 'none'}"
                )
        return info.obj(*args, **kwargs, **options)

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
REGISTRIES = {r.kind: r for r in (METHODS, DATASETS, BACKBONES, OPTIMIZERS, LOGGERS)}

register_method = METHODS.register
register_dataset = DATASETS.register
register_backbone = BACKBONES.register
register_optimizer = OPTIMIZERS.register
register_logger = LOGGERS.register
