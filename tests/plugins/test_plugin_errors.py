"""An exception from plugin code (building a plugin, or one of its hooks) ends the command with
one line naming the plugin and its package, exit 2, whatever the plugin's kind."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

# Registers broken plugins in the process, then runs the real command line in it.
SCRIPT = """
import sys
import torch
from suncet.methods import LabeledTerm, Method
from suncet.plugins.methods.simclr import SimCLR
from suncet.loggers import Logger
from suncet.registry import (register_backbone, register_dataset, register_label_loss, register_logger,
                             register_method, register_optimizer, register_preset)

{plugin}

from suncet.cli.main import main
main(args=sys.argv[1:], prog_name="suncet")
"""

BROKEN = {
    "method": """
@register_method("broken")
class Broken(SimCLR):
    def __init__(self, backbone, config):
        raise ValueError("no such layer size")
""",
    "method hook": """
@register_method("broken")
class Broken(SimCLR):
    def encode(self, images):
        raise RuntimeError("shapes do not match")
""",
    "dataset": """
@register_dataset("broken")
def broken(*, root=None, download=False):
    raise KeyError("train")
""",
    "dataset hook": """
class Unreadable:
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def load(self, indices):
        raise OSError(5, "Input/output error", "/mnt/data/shard-3")

@register_dataset("broken")
def broken(*, root=None, download=False):
    from suncet.plugins.datasets.digits import digits
    dataset = digits()
    dataset.train = Unreadable(dataset.train.labels)
    return dataset
""",
    "optimizer hook": """
class Exploding(torch.optim.SGD):
    def step(self, closure=None):
        raise FloatingPointError("overflow")

@register_optimizer("broken")
def broken(param_groups, *, lr, weight_decay, momentum):
    return Exploding(param_groups, lr=lr, momentum=momentum)
""",
    "logger hook": """
@register_logger("broken")
class Broken(Logger):
    def log_epoch(self, epoch, row):
        raise ConnectionError("server gone")
""",
    "preset": """
@register_preset("broken")
def broken():
    raise ImportError("needs a package")
""",
    "label loss": """
@register_label_loss("broken")
class Broken(LabeledTerm):
    def __init__(self, config):
        raise ValueError("bad head")
""",
}
FLAGS = {
    "method": ["--method", "broken"],
    "method hook": ["--method", "broken"],
    "dataset": ["--dataset", "broken"],
    "dataset hook": ["--dataset", "broken"],
    "optimizer hook": ["--optimizer", "broken"],
    "logger hook": ["--logger", "broken"],
    "preset": ["--preset", "broken"],
    "label loss": ["--label-loss", "broken"],
}
EXPECTED = {
    "method": "method 'broken' from package '__main__' failed to build: ValueError: no such layer size",
    "method hook": "method 'broken' from package '__main__' failed in forward: RuntimeError: shapes do not match",
    "dataset": "dataset 'broken' from package '__main__' failed to build: KeyError: 'train'",
    "dataset hook": "dataset 'broken' from package '__main__' failed in load: OSError: /mnt/data/shard-3: Input/output error",
    "optimizer hook": "optimizer 'broken' from package '__main__' failed in step: FloatingPointError: overflow",
    "logger hook": "logger 'broken' from package '__main__' failed in log_epoch: ConnectionError: server gone",
    "preset": "preset 'broken' from package '__main__' failed to build: ImportError: needs a package",
    "label loss": "label loss 'broken' from package '__main__' failed to build: ValueError: bad head",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_an_exception_from_plugin_code_is_one_line_naming_the_plugin(tmp_path, kind):
    script = SCRIPT.format(plugin=textwrap.dedent(BROKEN[kind]))
    command = [
        sys.executable,
        "-c",
        script,
        "train",
        *FLAGS[kind],
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--proj-hidden",
        "32",
        "--backbone-opt",
        "width=8",
        "--monitor-every",
        "0",
        "--final-eval",
        "none",
        "--out",
        str(tmp_path / "run"),
    ]
    # From tests/, so that the repository's unbuilt suncet/ is not first on the path.
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO / "tests", timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [f"error: {EXPECTED[kind]}"]
