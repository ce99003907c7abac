"""Built-in pre-training methods (see suncet.methods.Method for the interface)."""

from suncet.plugins.methods import dino, paws, simclr, supervised, swav  # noqa: F401  (registers the plugins)
