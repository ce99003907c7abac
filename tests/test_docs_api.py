"""What the docs show is the public API: every name they import or name, from every path they show,
imports; names that moved still import from the paths earlier docs showed, with a warning."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import warnings

import pytest
from conftest import REPO

DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "plugins").glob("examples/*/README.md")),
]
# Dotted names in the docs that are not Python paths: entry-point groups and a metadata key.
NOT_PATHS = {
    "suncet.datasets",
    "suncet.backbones",
    "suncet.optimizers",
    "suncet.presets",
    "suncet.label_losses",
    "suncet.backbone",
}
FROM_IMPORT = re.compile(r"^\s*from\s+(suncet[\w.]*)\s+import\s+(\([^)]*\)|[^\n]*)", re.M)
DOTTED = re.compile(r"`(suncet(?:\.\w+)+)")


def shown_imports() -> set[tuple[str, str]]:
    """(module, name) for every `from suncet... import a, b` in a doc."""
    found = set()
    for doc in DOCS:
        for module, names in FROM_IMPORT.findall(doc.read_text()):
            for name in re.split(r"[,\s]+", names.split("#")[0].strip("() \n")):
                if name and name.isidentifier():
                    found.add((module, name))
    return found


def shown_dotted() -> set[str]:
    """Every `suncet.x.y` a doc writes in code (a module, or a module's attribute)."""
    return {name for doc in DOCS for name in DOTTED.findall(doc.read_text()) if name not in NOT_PATHS}


def resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_docs_show_imports_and_names():
    assert len(shown_imports()) >= 12 and len(shown_dotted()) >= 25  # the parser still finds them


@pytest.mark.parametrize("module,name", sorted(shown_imports()))
def test_every_import_the_docs_show_works_without_a_warning(module, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert getattr(importlib.import_module(module), name) is not None


@pytest.mark.parametrize("dotted", sorted(shown_dotted()))
def test_every_dotted_name_the_docs_show_resolves(dotted):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        resolve(dotted)


EARLIER_DOCS = [
    ("suncet.augment", ["AugmentRecipe", "CropSpec", "BatchAugment"]),
    ("suncet.pipeline", ["DevicePipeline"]),
    ("suncet.worker_pipeline", ["WorkerPipeline"]),
    ("suncet.labels", ["read_subset_file"]),
]


@pytest.mark.parametrize("module,names", EARLIER_DOCS)
def test_paths_earlier_docs_showed_still_import_with_a_deprecation_warning(module, names):
    """In a fresh interpreter, so the module's first import (which warns) happens here."""
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        f"try:\n    from {module} import {', '.join(names)}\n"
        "except DeprecationWarning as w:\n    print('WARNED', w)\n"
        "warnings.simplefilter('ignore')\n"
        f"from {module} import {', '.join(names)}\nprint('IMPORTED')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "tests")
    assert done.returncode == 0, done.stderr
    assert f"WARNED {module} moved to suncet." in done.stdout and "IMPORTED" in done.stdout


def test_names_the_method_docs_showed_still_work_with_a_deprecation_warning():
    import torch

    from suncet.config import TrainConfig
    from suncet.methods import MethodConfig, forward_in_one_pass

    with pytest.warns(DeprecationWarning, match="forward_in_one_pass is deprecated"):
        parts = forward_in_one_pass(torch.nn.Identity(), torch.nn.Identity(), [torch.ones(2, 3), torch.zeros(1, 3)])
    assert [p.shape[0] for p in parts] == [2, 1]
    with pytest.warns(DeprecationWarning, match="MethodConfig.gather is deprecated"):
        assert MethodConfig(TrainConfig(), 10).gather == "grad"
    from suncet.data import TrainBatch

    with pytest.warns(DeprecationWarning, match="suncet.methods.TrainBatch moved to suncet.data.TrainBatch"):
        from suncet.methods import TrainBatch as earlier
    assert earlier is TrainBatch
