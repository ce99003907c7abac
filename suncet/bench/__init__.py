"""Micro-benchmarks shipped with the package (`suncet bench ...`); their JSON goes through
suncet.engine.rundir.write_json, the one atomic writer."""

import argparse
import os
from pathlib import Path

from suncet.errors import ConfigError


def json_output(text: str) -> Path:
    """The argparse type of a benchmarks/ script's ``--json``: a file that can be written, checked
    before any work, so that a wrong path costs one line and not the run's figures."""
    from suncet.engine.rundir import check_output_file

    try:
        path = check_output_file(text, True, "--json")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    folder = path.absolute().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{path} cannot be written: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path} cannot be written: the folder {folder} is not writable")
    return path
