"""suncet: contrastive semi-supervised pre-training (SimCLR / SwAV + SuNCEt) with fused kernels."""

from importlib.metadata import PackageNotFoundError, version

import torch  # noqa: F401  (loads libtorch before the C++ extension needs it)

try:
    __version__ = version("suncet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
