"""Built-in pre-training methods (see suncet.methods.Method for the interface)."""

from suncet.plugins.methods import barlowtwins, paws, simclr, supervised, swav, vicreg  # noqa: F401  (registers the plugins)
