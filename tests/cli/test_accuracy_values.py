"""Accuracies that cannot be: values outside [0, 1] in a run's files are refused by `compare` and
make `runs` list the run as damaged; an evaluation whose labels cover few classes says so and
reports no top-5 ranked among classes that were never labeled."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import refused

from suncet.cli.main import main
from suncet.registry import DATASETS


@pytest.mark.parametrize("value", ["1.5", "-0.01", "100"])
def test_compare_refuses_an_accuracy_outside_0_and_1(tmp_path, copy_of_finished_run, value):
    run = copy_of_finished_run()
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[1].split(",")
    cells[header.index("knn_top1")] = value
    (run / "metrics.csv").write_text("\n".join([lines[0], ",".join(cells)]) + "\n")
    refused(tmp_path, ["compare", str(run)], f"knn_top1 is {float(value):g}, not an accuracy in [0, 1]")
    listed = json.loads(CliRunner().invoke(main, ["runs", str(tmp_path), "--json"]).stdout)
    assert listed[0]["state"] == "damaged" and "not an accuracy in [0, 1]" in listed[0]["reason"]


@pytest.mark.parametrize("classes,top5", [(1, False), (5, False), (6, True)])
def test_an_evaluation_says_what_classes_its_labels_cover(tmp_path, finished_run, classes, top5):
    labels = DATASETS.create("digits").train.labels
    chosen = torch.cat([torch.nonzero(labels == c).flatten()[:4] for c in range(classes)])
    (tmp_path / "labels.txt").write_text("\n".join(map(str, chosen.tolist())) + "\n")
    result = CliRunner().invoke(
        main, ["eval", str(finished_run), "--protocol", "knn", "--labels", str(tmp_path / "labels.txt"), "--json"]
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["labeled_classes"] == classes and ("top5" in scores) == top5
    assert ("top5" in scores["raw_pixels"]) == top5
    table = CliRunner().invoke(
        main,
        ["eval", str(finished_run), "--protocol", "knn", "--labels", str(tmp_path / "labels.txt")],
        env={"COLUMNS": "200"},
    )
    assert f"{4 * classes} ({classes} class" in table.stdout
    assert ("no top-5" in table.stdout) == (not top5)
