"""Built-in datasets.

A dataset plugin is a callable ``(*, root: str | None, download: bool)`` returning a
``suncet.data.ImageDataset``.
"""

from suncet.plugins.datasets import cifar, digits, imagefolder, stl10  # noqa: F401  (registers the plugins)
