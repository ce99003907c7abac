"""Plugin registry for methods, datasets, backbones, optimizers, loggers, presets and label losses.

In-tree code registers with a decorator (``@register_method("simclr")``). Packages, the
built-in ``suncet.plugins`` included, announce plugins through entry points in the groups
``suncet.methods``, ``suncet.datasets``, ``suncet.backbones``, ``suncet.optimizers``,
``suncet.loggers``, ``suncet.presets`` and ``suncet.label_losses``; a group is loaded the first
time its registry is looked up. Plugin code runs under ``plugin_code``, which names the plugin
when it fails. An entry point
may name a module whose import runs the decorators, or a single object, registered under the
entry point's name.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata as metadata
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from suncet.config import Range, option_value
from suncet.errors import ConfigError, SuncetError, shown

__all__ = [
    "BACKBONES",
    "DATASETS",
    "LOGGERS",
    "METHODS",
    "OPTIMIZERS",
    "PRESETS",
    "REGISTRIES",
    "LABEL_LOSSES",
    "DuplicatePluginError",
    "PluginCodeError",
    "PluginError",
    "PluginImportError",
    "PluginInfo",
    "Range",
    "Registry",
    "UnknownPluginError",
    "plugin_code",
    "register_backbone",
    "register_dataset",
    "register_label_loss",
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


class PluginCodeError(PluginError):
    """A plugin's own code raised: the run stops with one line naming the plugin."""

    exit_code = 2


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


def plugin_failure(exc: BaseException) -> str:
    """An exception from plugin code as the end of one line: its type and the first line of its text."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        lines = str(exc).strip().splitlines()
        text = lines[0] if lines else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def plugin_code(info: PluginInfo, hook: str | None = None) -> Iterator[None]:
    """Run plugin code (building a plugin, or its ``hook``): an exception it raises becomes one
    PluginCodeError line naming the plugin and its package. suncet's own errors (a plugin may
    raise ConfigError with a message for the user) pass unchanged; ``--debug`` shows the cause."""
    try:
        yield
    except SuncetError:
        raise
    except Exception as exc:
        where = f"failed in {hook}" if hook else "failed to build"
        raise PluginCodeError(
            f"{info.kind} '{info.name}' from package '{info.source}' {where}: {plugin_failure(exc)}"
        ) from exc


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
        for ep in sorted(
            metadata.entry_points(group=self.group), key=lambda e: (e.dist.name if e.dist else "", e.name)
        ):
            dist = ep.dist.name if ep.dist is not None else "?"
            token = _loading_source.set(dist)
            try:
                loaded = ep.load()
                if not isinstance(loaded, types.ModuleType):
                    self.add(ep.name, loaded, source=dist)
            except Exception as exc:  # any error inside third-party code is reported, never fatal here
                self._failures.append(PluginFailure(self.kind, ep.name, ep.value, dist, f"{type(exc).__name__}: {exc}"))
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

    def check_options(
        self, name: str, options: dict[str, Any] | None, engine_args: tuple[str, ...] = ()
    ) -> dict[str, Any]:
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
        accepted = {
            n: p
            for n, p in parameters.items()
            if p.kind in named and p.default is not inspect.Parameter.empty and n not in engine_args
        }
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{self.kind} '{name}' has no option {shown(unknown[0])}; its options: {', '.join(accepted) or 'none'}"
            )
        owner = f"{self.kind} '{name}'"
        return {k: option_value(owner, k, v, hints.get(k), accepted[k].default) for k, v in options.items()}

    def create(self, name: str, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Call plugin ``name`` with ``args``/``kwargs`` from the engine plus the user's checked ``options``."""
        options = self.check_options(name, options, tuple(kwargs))
        info = self.get(name)
        with plugin_code(info):
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
PRESETS = Registry("preset", "suncet.presets")
LABEL_LOSSES = Registry("label loss", "suncet.label_losses")
REGISTRIES = {r.kind: r for r in (METHODS, DATASETS, BACKBONES, OPTIMIZERS, LOGGERS, PRESETS, LABEL_LOSSES)}

register_method = METHODS.register
register_dataset = DATASETS.register
register_backbone = BACKBONES.register
register_optimizer = OPTIMIZERS.register
register_logger = LOGGERS.register
register_preset = PRESETS.register
register_label_loss = LABEL_LOSSES.register
