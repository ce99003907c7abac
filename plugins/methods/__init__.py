"""Built-in pre-training methods (see suncet.methods.Method for the interface)."""

from suncet.plugins.methods import (  # noqa: F401  (registers the plugins)
    barlowtwins,
    byol,
    dino,
    moco,
    paws,
    simclr,
    supervised,
    swav,
    vicreg,
)
