"""Import paths of modules that moved, kept working for one release with a DeprecationWarning.

``import suncet`` installs the finder, so ``from suncet.augment import AugmentRecipe`` (the path
earlier docs showed) still imports, warning once with the new path. The names come from the
new modules; nothing is copied.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

REMOVED_IN = "0.3"

# Old module -> the modules its names now live in, searched in order.
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "suncet.augment": ("suncet.data.augment", "suncet.data.recipe"),
    "suncet.augment_triton": ("suncet.data.augment_triton",),
    "suncet.labels": ("suncet.data.labels",),
    "suncet.pipeline": ("suncet.data.pipeline",),
    "suncet.samplers": ("suncet.data.samplers",),
    "suncet.transfer": ("suncet.data.transfer",),
    "suncet.worker_pipeline": ("suncet.data.worker_pipeline",),
    "suncet.checkpoint": ("suncet.engine.state",),
    "suncet.evaluation": ("suncet.engine.protocols",),
    "suncet.stopping": ("suncet.engine.stopping",),
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module):
        targets = MOVED_MODULES[module.__name__]
        warnings.warn(
            f"{module.__name__} moved to {' and '.join(targets)}; the old path goes in suncet {REMOVED_IN}",
            DeprecationWarning,
            stacklevel=2,
        )
        loaded = [importlib.import_module(name) for name in targets]

        def forward(name: str):
            for target in loaded:
                if hasattr(target, name):
                    return getattr(target, name)
            raise AttributeError(
                f"module {module.__name__!r} (moved to {' and '.join(targets)}) has no attribute {name!r}"
            )

        module.__getattr__ = forward
        module.__dir__ = lambda: sorted({n for target in loaded for n in dir(target)})


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
