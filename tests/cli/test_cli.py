"""The command line as a user meets it: help, version, plugins, doctor, and one-line errors."""

from __future__ import annotations

import json

import suncet
from suncet.kernels import cpu


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("train", "eval", "bench", "plugins", "doctor"):
        assert command in result.stdout


def test_version(cli):
    result = cli("--version")
    assert result.returncode == 0 and suncet.__version__ in result.stdout


def test_plugins_table_shows_builtins_with_their_source(cli):
    result = cli("plugins")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for kind, name in [
        ("method", "simclr"),
        ("method", "supervised"),
        ("dataset", "digits"),
        ("backbone", "resnet18"),
        ("backbone", "small_resnet"),
        ("optimizer", "lars"),
    ]:
        row = next(line for line in lines if f" {name} " in line and kind in line)
        assert " suncet " in row


def test_doctor_reports_versions_and_backends(cli):
    result = cli("doctor")
    assert result.returncode == 0
    assert "torch" in result.stdout and "reference" in result.stdout
    assert "auto selects" in result.stdout


def test_unknown_method_is_one_line_with_the_choices(cli, tmp_path):
    result = cli("train", "--method", "nope", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown method 'nope'" in result.stderr and "simclr" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_label_spec_is_one_line(cli, tmp_path):
    result = cli("train", "--labels", "150%", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "--labels 150%" in result.stderr and "Traceback" not in result.stderr


def test_bench_kernels_writes_figures_for_the_cpu_backends(cli, tmp_path):
    report = tmp_path / "kernels.json"
    result = cli(
        "bench",
        "kernels",
        "--device",
        "cpu",
        "--n",
        "64",
        "--d",
        "16",
        "--dtype",
        "fp32",
        "--backend",
        "cpu,reference",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--cpu-variant",
        "all",
        "--json",
        str(report),
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(report.read_text())["results"]
    # The cpu backend once per variant this processor runs, each against its own GEMM floor.
    variants = cpu.variants()
    assert [(r["backend"], r["cpu_variant"]) for r in results] == [("cpu", v) for v in variants] + [("reference", None)]
    assert all(r["n"] == 64 and r["d"] == 16 and r["error"] is None and r["step_ms"] > 0 for r in results)
    assert all(r["floor_ms"] > 0 and r["step_over_floor"] == r["step_ms"] / r["floor_ms"] for r in results)
    # Rewritten after each row and once more at the end, with the ratios to eager.
    assert all(r["speedup_vs_eager"] > 0 for r in results) and not report.with_name("kernels.json.partial").exists()
    refused = cli("bench", "kernels", "--device", "cpu", "--n", "64", "--backend", "reference", "--cpu-variant", "avx2")
    assert refused.returncode == 2 and "--cpu-variant times the cpu backend" in refused.stderr
    refused = cli("bench", "kernels", "--device", "cpu", "--n", "64", "--cpu-variant", "sse9")
    assert refused.returncode == 2 and "unknown --cpu-variant 'sse9'" in refused.stderr


def test_bench_data_times_every_path_against_the_torchvision_loader(cli, tmp_path):
    report = tmp_path / "data.json"
    result = cli(
        "bench",
        "data",
        "--device",
        "cpu",
        "--resolution",
        "32",
        "--batch",
        "8",
        "--steps",
        "1",
        "--workers",
        "0",
        "--seconds",
        "0.01",
        "--decode-files",
        "2",
        "--no-train",
        "--json",
        str(report),
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(report.read_text())["figures"]
    paths = {(f["measurement"], f["path"]) for f in figures}
    assert ("pipeline", "torchvision DataLoader (baseline)") in paths and ("pipeline", "workers") in paths
    assert ("augment", "torchvision v2 per image") in paths and ("decode", "jpeg -> 256 px (cpu)") in paths
    assert all(f["rate"] > 0 for f in figures)
    assert "pipeline / workers / 32 px, 0 workers:" in result.stdout  # each figure is printed as it lands


def test_bench_data_refuses_a_zero_step_count(cli):
    result = cli("bench", "data", "--device", "cpu", "--train-steps", "0")
    assert result.returncode != 0 and "--train-steps must be at least 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr
