"""`suncet compare` arithmetic on synthetic metric files, plots, and `suncet sweep` resumption."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml
from conftest import REPO

from suncet.compare import compare_table, crossing, group_runs, load_curve, slowest_best


def fake_run(path, accuracies, seed=0, suncet_weight=1.0, images_per_epoch=100, seconds_per_epoch=2.0, **settings):
    path.mkdir(parents=True)
    config = {"method": "simclr", "labels": "10%", "seed": seed, "suncet_weight": suncet_weight, **settings}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "labels.txt").write_text(f"# labeled training indices for --labels {config['labels']}\n1\n")
    lines = ["epoch,step,loss,images_seen,train_seconds,knn_top1"]
    for epoch, acc in enumerate(accuracies, start=1):
        lines.append(f"{epoch},{epoch * 10},1.0,{epoch * images_per_epoch},{epoch * seconds_per_epoch},{acc}")
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    return path


def test_crossing_interpolates_between_logged_points():
    xs, ys = [1, 2, 3, 4], [0.5, 0.7, 0.8, 0.9]
    assert crossing(xs, ys, 0.75) == pytest.approx(2.5)
    assert crossing(xs, ys, 0.9) == pytest.approx(4)
    assert crossing(xs, ys, 0.4) == 1  # reached at the first logged point
    assert crossing(xs, ys, 0.95) is None


def test_table_speedups_against_the_slowest_group(tmp_path):
    slow = load_curve(fake_run(tmp_path / "slow", [0.5, 0.7, 0.8, 0.9], suncet_weight=0.0), "knn_top1")
    fast = load_curve(fake_run(tmp_path / "fast", [0.6, 0.8, 0.9, 0.95], images_per_epoch=120), "knn_top1")
    groups = group_runs([slow, fast])
    assert slowest_best(groups) == pytest.approx(0.9)
    rows = {r["group"]: r for r in compare_table(groups, 0.9)}
    assert set(rows) == {"no SuNCEt", "+ SuNCEt"}
    assert rows["no SuNCEt"]["epochs"] == pytest.approx(4) and rows["+ SuNCEt"]["epochs"] == pytest.approx(3)
    assert rows["+ SuNCEt"]["epochs_speedup"] == pytest.approx(4 / 3)
    assert rows["+ SuNCEt"]["images"] == pytest.approx(360) and rows["+ SuNCEt"]["images_speedup"] == pytest.approx(
        400 / 360
    )
    assert rows["+ SuNCEt"]["seconds_speedup"] == pytest.approx(8 / 6)
    rows = {r["group"]: r for r in compare_table(groups, 0.97)}
    assert math.isnan(rows["+ SuNCEt"]["epochs"]) and rows["+ SuNCEt"]["epochs_reached"] == "0/1"


def test_groups_are_named_by_their_actual_labeled_term(tmp_path):
    curves = [
        load_curve(fake_run(tmp_path / name, [0.5, 0.6], suncet_weight=weight, **extra), "knn_top1")
        for name, weight, extra in [
            ("off", 0.0, {}),
            ("half", 0.5, {}),
            ("full", 1.0, {}),
            ("ce", 1.0, {"label_loss": "ce"}),
        ]
    ]
    assert [g.label for g in group_runs(curves)] == ["no SuNCEt", "+ 0.5 x SuNCEt", "+ SuNCEt", "+ CE"]


def test_seeds_form_one_group_with_mean_and_spread(tmp_path):
    curves = [
        load_curve(fake_run(tmp_path / f"s{seed}", acc, seed=seed), "knn_top1")
        for seed, acc in enumerate([[0.5, 0.9], [0.7, 0.85]])
    ]
    [group] = group_runs(curves)
    assert len(group.curves) == 2
    assert slowest_best([group]) == pytest.approx(0.85)  # every seed of the group reaches it
    [row] = compare_table([group], 0.8)
    # crossings at 1.75 (0.5 -> 0.9) and 1.666.. (0.7 -> 0.85); sample standard deviation
    assert row["epochs"] == pytest.approx((1.75 + 5 / 3) / 2) and row["epochs_std"] == pytest.approx(
        math.sqrt(2 * (1 / 24) ** 2)
    )


def test_missing_metric_is_a_clear_error(tmp_path):
    fake_run(tmp_path / "r", [0.5])
    with pytest.raises(Exception, match="no linear_top1 values .*--probe-every"):
        load_curve(tmp_path / "r", "linear_top1")


def test_compare_cli_writes_plot_and_json(cli, tmp_path):
    fake_run(tmp_path / "a", [0.5, 0.7, 0.8, 0.9], suncet_weight=0.0)
    fake_run(tmp_path / "b", [0.6, 0.8, 0.9, 0.95])
    result = cli(
        "compare",
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--plot",
        str(tmp_path / "c.png"),
        "--json",
        str(tmp_path / "c.json"),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "c.png").stat().st_size > 5000
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["target"] == pytest.approx(0.9) and len(data["groups"]) == 2


def test_sweep_runs_the_grid_then_skips_finished_runs(cli, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "out": str(tmp_path / "runs"),
                "base": {
                    "epochs": 1,
                    "batch_size": 64,
                    "proj_hidden": 32,
                    "backbone_options": {"width": 8},
                    "monitor_every": 1,
                },
                "grid": {"suncet_weight": [0.0, 1.0], "seed": [0, 1]},
                "compare": {"metric": "knn_top1", "x": "epochs", "panels": []},
            }
        )
    )
    result = cli("sweep", str(sweep))
    assert result.returncode == 0, result.stderr
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert len(runs) == 4 and (tmp_path / "runs" / "compare-all.png").is_file()
    assert json.loads((tmp_path / "runs" / "summary.json").read_text())[0]["groups"]
    stamps = {p: (p / "metrics.csv").stat().st_mtime_ns for p in runs}
    shutil.rmtree(runs[0] / "checkpoints")  # as if that run had died in its first epoch
    (runs[0] / "metrics.csv").unlink()
    result = cli("sweep", str(sweep))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": done") == 3 and result.stdout.count(": to run") == 1
    assert all((p / "metrics.csv").stat().st_mtime_ns == stamps[p] for p in runs[1:])
    assert len((runs[0] / "metrics.csv").read_text().splitlines()) == 2


def test_bad_sweep_file(cli, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid: {epochz: [1]}\n")
    result = cli("sweep", str(sweep))
    assert result.returncode == 2 and "'epochz' is not a config key" in result.stderr


def test_sweep_shards_split_the_grid(cli, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump({"out": str(tmp_path / "runs"), "base": {"probe_every": 1}, "grid": {"seed": [0, 1, 2]}})
    )
    result = cli("sweep", str(sweep), "--dry-run", "--shard", "2/2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("another shard") == 2 and result.stdout.count("to run") == 1
    result = cli("sweep", str(sweep), "--shard", "0/2")
    assert result.returncode == 2 and "--shard" in result.stderr


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_are_valid_grids(path):
    from suncet.sweep import expand, load_sweep

    sweep = load_sweep(path)  # builds and checks every run's configuration
    assert len(expand(sweep)) == math.prod(len(values) for values in sweep.grid.values()) * len(sweep.variants)
