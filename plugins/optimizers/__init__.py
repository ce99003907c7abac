"""Built-in optimizers: LARS, SGD, AdamW.

An optimizer plugin is a callable ``(param_groups, *, lr, weight_decay, momentum, **options)``
returning a ``torch.optim.Optimizer``; groups come from ``suncet.optim.parameter_groups``.
"""

from suncet.plugins.optimizers import lars, standard  # noqa: F401  (registers the plugins)
