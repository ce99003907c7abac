"""The plugin registry: decorators, entry points of installed distributions, and its errors."""

from __future__ import annotations

import sys
import textwrap

import pytest
from conftest import install_fake_distribution

from suncet.registry import (
    METHODS,
    DuplicatePluginError,
    PluginImportError,
    Registry,
    UnknownPluginError,
)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in [m for m in sys.modules if m.startswith("fakeplug_")]:
        del sys.modules[module]


def test_builtin_plugins_come_through_entry_points_with_their_package():
    for name in ("simclr", "supervised"):
        info = METHODS.get(name)
        assert info.source == "suncet"
        assert info.obj.__module__.startswith("suncet.plugins.methods")


def test_entry_point_object_and_module_forms(site):
    install_fake_distribution(
        site,
        "fake-plugins",
        "test.things",
        {"alpha": "fakeplug_alpha:Alpha", "bundle": "fakeplug_bundle"},
        {
            "fakeplug_alpha": '''
                class Alpha:
                    """The alpha thing."""
            ''',
            "fakeplug_bundle": """
                import fakeplug_registry_holder as holder
                @holder.REGISTRY.register("beta", description="decorated in a module")
                class Beta:
                    pass
            """,
            "fakeplug_registry_holder": "REGISTRY = None\n",
        },
    )
    registry = Registry("thing", "test.things")
    import fakeplug_registry_holder

    fakeplug_registry_holder.REGISTRY = registry
    assert registry.names() == ["alpha", "beta"]
    alpha, beta = registry.get("alpha"), registry.get("beta")
    assert (alpha.source, alpha.description) == ("fake-plugins", "The alpha thing.")
    assert (beta.source, beta.description) == ("fake-plugins", "decorated in a module")


def test_unknown_name_lists_available(site):
    registry = Registry("thing", "test.nothing")

    @registry.register("one")
    class One:
        pass

    with pytest.raises(UnknownPluginError, match=r"unknown thing 'two'; available: one"):
        registry.get("two")


def test_duplicate_name_names_both_packages(site):
    install_fake_distribution(
        site, "fake-dup", "test.dups", {"simclr": "fakeplug_dup:Other"}, {"fakeplug_dup": "class Other:\n    pass\n"}
    )
    registry = Registry("method", "test.dups")

    @registry.register("simclr")
    class Mine:
        pass

    with pytest.raises(
        DuplicatePluginError, match=r"'simclr' is registered twice: by package '.*' .* and by package 'fake-dup'"
    ):
        registry.get("simclr")


def test_broken_plugin_is_reported_with_its_package_and_others_still_load(site):
    install_fake_distribution(
        site,
        "fake-broken",
        "test.broken",
        {"broken": "fakeplug_broken:Thing", "fine": "fakeplug_fine:Fine"},
        {"fakeplug_broken": "import a_module_that_does_not_exist\n", "fakeplug_fine": "class Fine:\n    pass\n"},
    )
    registry = Registry("method", "test.broken")
    assert registry.get("fine").source == "fake-broken"
    with pytest.raises(
        PluginImportError, match=r"'broken' from package 'fake-broken' failed to import .*a_module_that_does_not_exist"
    ):
        registry.get("broken")
    with pytest.raises(UnknownPluginError, match=r"failed to import: 'broken' from package 'fake-broken'"):
        registry.get("other")
    [failure] = registry.failures()
    assert failure.source == "fake-broken"


def test_create_rejects_unknown_options():
    registry = Registry("thing", "test.none")

    @registry.register("maker")
    def maker(*, size: int = 1, colour: str = "red"):
        return size, colour

    assert registry.create("maker", options={"size": 3}) == (3, "red")
    with pytest.raises(Exception, match=r"thing 'maker' has no option 'shape'; its options: size, colour"):
        registry.create("maker", options={"shape": 2})


TOY_PACKAGE = '''
"""A dataset package outside suncet that ships its own preset."""

import torch

from suncet.data import AugmentRecipe, CropSpec, ImageDataset, InMemoryImages


def toyset(*, root=None, download=False):
    """Twelve random 8x8 images in three classes."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(12) % 3
    split = InMemoryImages(images, labels)
    recipe = AugmentRecipe(CropSpec(8, (0.5, 1.0)), CropSpec(6, (0.2, 0.5)), 0.5, 0.0, (0.5,), (0.25,), flip_p=0.0)
    return ImageDataset(name="toyset", train=split, test=split, num_classes=3, channels=1, image_size=8, recipe=recipe)


def toyset_preset():
    """The toy set's recipe."""
    return {"backbone": "small_resnet", "backbone_options": {"width": 4}, "proj_hidden": 16, "proj_dim": 8,
            "batch_size": 6, "classes_per_step": 3, "images_per_class": 2, "epochs": 1, "tau": 0.7, "lr": 0.5,
            "lr_batch": 12, "method_defaults": {"swav": {"local_crops": 0}}}
'''


def test_a_dataset_package_ships_a_preset_that_its_dataset_picks_up(cli, tmp_path):
    import subprocess

    source = tmp_path / "src"
    (source / "suncet_toyset").mkdir(parents=True)
    (source / "suncet_toyset" / "__init__.py").write_text(TOY_PACKAGE)
    (source / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "suncet-toyset"
        version = "1.0"
        [project.entry-points."suncet.datasets"]
        toyset = "suncet_toyset:toyset"
        [project.entry-points."suncet.presets"]
        toyset = "suncet_toyset:toyset_preset"
        [tool.setuptools]
        packages = ["suncet_toyset"]
    """)
    )
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    env = {"PYTHONPATH": str(target)}
    listed = cli("plugins", env=env)
    assert any("toyset" in line and "preset" in line and "suncet-toyset" in line for line in listed.stdout.splitlines())
    printed = cli("train", "--dataset", "toyset", "--print-config", env=env)
    assert printed.returncode == 0, printed.stderr
    assert "batch_size: 6\n" in printed.stdout and "tau: 0.7\n" in printed.stdout and "lr: 0.25\n" in printed.stdout
    run = tmp_path / "run"
    trained = cli("train", "--dataset", "toyset", "--method", "swav", "--final-eval", "knn", "--out", str(run), env=env)
    assert trained.returncode == 0, trained.stderr
    assert "local_crops: 0" in (run / "config.yaml").read_text()


def test_a_preset_with_an_unknown_key_names_its_package(site):
    from suncet.errors import ConfigError
    from suncet.presets import build_config
    from suncet.registry import PRESETS

    PRESETS.add("typo-preset", lambda: {"epoch": 3}, source="typo-package")
    try:
        with pytest.raises(ConfigError, match="unknown preset 'typo-preset' \\(package 'typo-package'\\) key 'epoch'"):
            build_config(overrides={"preset": "typo-preset"})
    finally:
        PRESETS._plugins.pop("typo-preset")
