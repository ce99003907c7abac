"""Wall time and images/s of the README's main command with and without --compile.

    python benchmarks/bench_compile.py [--modes none,default] [--epochs N] [--json FILE]
    python benchmarks/bench_compile.py --modes none,reduce-overhead --train-args "--backbone resnet18 --sync-every 16"

Runs `suncet train --method simclr --labels 10%` (the digits preset) once per mode as a user
would, in a fresh process with its own run directory, and reports for each: the whole
command's wall time, the first epoch's training seconds (where torch.compile compiles), and
the median images/s of the other epochs (the steady state). Writes the JSON after each mode.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from suncet.bench import json_output
from suncet.engine.rundir import write_json

SUNCET = str(Path(sys.executable).parent / "suncet")
MAIN_COMMAND = ["train", "--method", "simclr", "--labels", "10%"]


def measure(mode: str, epochs: int | None, scratch: Path, extra: list[str]) -> dict:
    run_dir = scratch / f"compile-{mode}"
    command = [SUNCET, *MAIN_COMMAND, *extra, "--compile", mode, "--out", str(run_dir)]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    steady = [float(r["images_per_second"]) for r in rows[1:]] or [float(rows[0]["images_per_second"])]
    return {
        "compile": mode,
        "epochs": len(rows),
        "wall_seconds": round(wall, 1),
        "first_epoch_seconds": float(rows[0]["train_seconds"]),
        "train_seconds": float(rows[-1]["train_seconds"]),
        "steady_images_per_second": round(statistics.median(steady), 1),
        "final_knn_top1": float(rows[-1]["knn_top1"]),
        "command": " ".join(["suncet", *command[1:-2]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="none,default")
    parser.add_argument("--epochs", type=int, help="Override the preset's 200 epochs (a shorter check).")
    parser.add_argument("--train-args", default="", help="More `suncet train` flags, e.g. for a GPU run.")
    parser.add_argument("--json", type=json_output, default="benchmarks/results/cpu_compile.json")
    args = parser.parse_args()
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cores": os.cpu_count(),
        },
        "results": [],
    }
    scratch = Path(tempfile.mkdtemp(prefix="suncet-compile-"))
    try:
        for mode in args.modes.split(","):
            result = measure(mode, args.epochs, scratch, shlex.split(args.train_args))
            report["results"].append(result)
            print(result, flush=True)
            write_json(Path(args.json), report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
