"""Built-in presets: the paper's runs, and the tuned recipes of the built-in datasets.

A preset plugin is a callable with no arguments returning a dict of settings (TrainConfig keys,
plus ``method_defaults``: options for one method only). A preset named after a dataset is that
dataset's default recipe, and one named ``<method>-<dataset>`` that method's default on it.
Learning rates are stated for a global batch (``lr_batch``) and scale with the run's own
(suncet/optim.py, ``scale_learning_rates``).
"""

from suncet.plugins.presets import byol, datasets, dino, moco, paper, redundancy  # noqa: F401  (registers the plugins)
