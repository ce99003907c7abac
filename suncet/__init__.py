"""suncet: contrastive semi-supervised pre-training (SimCLR / SwAV + SuNCEt) with fused kernels."""

from suncet import moved

moved.install()

__all__ = ["RunResult", "TrainConfig", "__version__", "export_backbone", "load_backbone", "train"]

_API = {
    "train": "suncet.engine.api",
    "RunResult": "suncet.engine.api",
    "load_backbone": "suncet.engine.export",
    "export_backbone": "suncet.engine.export",
    "TrainConfig": "suncet.config",
}


def __getattr__(name: str):
    # Imported on first use: `import suncet` stays light for the kernels and the CLI's start-up
    # (whose stop-request handlers are installed before anything heavy loads, cli/entry.py).
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("suncet")
        except PackageNotFoundError:  # running from a source tree that was never installed
            return "0+unknown"
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'suncet' has no attribute {name!r}")
