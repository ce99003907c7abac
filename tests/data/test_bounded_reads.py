"""Files whose size bounds what reading them costs: a CIFAR pickle whose rows or labels all refer
to one object is refused before anything is built from it, and `suncet runs` reads a metrics file
of any size a row at a time."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import SUNCET, dump, write_cifar10

from suncet.errors import ConfigError
from suncet.registry import DATASETS


def pickled_size(content: dict) -> int:
    return len(pickle.dumps(content, protocol=2))


ROW = list(range(256)) * 12  # one 3,072-value row, as a list


@pytest.mark.parametrize(
    "content,message",
    [
        # 60,000 references to one row: 180 KB pickled, 1.5 GB as an int64 array.
        ({"labels": [0] * 60_000, "data": [ROW] * 60_000}, "'data' is a list, expected uint8 [N, 3072]"),
        ({"labels": [0] * 4, "data": np.zeros((4, 3072), np.int64)}, "'data' is int64 of shape (4, 3072)"),
        (
            {"labels": [ROW] * 60_000, "data": np.zeros((60_000, 3072), np.uint8)[:1]},
            "'labels' is not a list of class numbers",
        ),
        ({"labels": [10**30], "data": np.zeros((1, 3072), np.uint8)}, "too large to be a class"),
        ({"labels": ["cat"], "data": np.zeros((1, 3072), np.uint8)}, "'labels' is not a list of class numbers"),
    ],
    ids=["rows by reference", "int64 rows", "labels by reference", "huge label", "text label"],
)
def test_a_cifar_pickle_is_checked_as_read_before_anything_is_built(tmp_path, content, message):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    dump(batch, content)
    assert batch.stat().st_size < 2_000_000
    with pytest.raises(ConfigError, match=re.escape(message)):
        DATASETS.create("cifar10", root=str(tmp_path))


def test_cifar_class_names_by_reference_are_refused(tmp_path):
    write_cifar10(tmp_path)
    dump(tmp_path / "cifar-10-batches-py" / "batches.meta", {"label_names": [ROW] * 10})
    with pytest.raises(ConfigError, match="'label_names' is not a list of class names"):
        DATASETS.create("cifar10", root=str(tmp_path))


def peak_memory_of(*command: str) -> tuple[int, str]:
    """Run ``command``; its peak resident memory in KiB (a wrapper process whose one child it
    is reports it) and its output."""
    measure = (
        "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True); "
        "assert done.returncode == 0, done.stderr; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stdout.write(done.stdout.decode())"
    )
    result = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    head, _, output = result.stdout.partition("\n")
    return int(head), output


def test_runs_reads_a_large_metrics_file_in_bounded_memory(tmp_path, copy_of_finished_run):
    run = copy_of_finished_run("runs/big")
    metrics = run / "metrics.csv"
    metrics.write_text("epoch,loss,knn_top1\n2,0.4,0.5\n")
    baseline, _ = peak_memory_of(SUNCET, "runs", str(run.parent), "--json")
    with open(metrics, "w") as handle:
        handle.write("epoch,loss,knn_top1\n")
        row = "1,0.5,0.25\n"
        handle.write(row * (30_000_000 // len(row)))  # 30 MB, 2.7 million rows
        handle.write("2,0.4,0.5\n")
    peak, listing = peak_memory_of(SUNCET, "runs", str(run.parent), "--json")
    [summary] = json.loads(listing)
    assert summary["epochs_done"] == 2 and summary["knn_top1_best"] == 0.5 and summary["knn_top1_last"] == 0.5
    # Its rows as dicts would take about a gigabyte more; a row at a time, about nothing.
    assert peak - baseline < 100_000, f"{(peak - baseline) / 1024:.0f} MiB more than for a 2-row file"
