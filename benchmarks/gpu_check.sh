#!/usr/bin/env bash
# The one-call device check on an H100/H200, in order of importance: build the extension with
# CUDA, run the gpu-marked tests (kernels, augmentation kernels, no host sync in the device
# pipeline), time each Triton tile configuration as kernel time (benchmarks/kernel_anatomy.py),
# time the Triton backend from Python, eager and as CUDA graphs, at N = 8192 / 32768 / 2048 in
# bf16 and fp32, then the host time of a fused-loss step (benchmarks/profile_host.py, with real
# launches and with stubbed ones), then PAWS's soft nearest neighbour each way (suncet bench
# snn). That is the default run, at most 480 s. --all adds the cuda
# backend and eager PyTorch to the Python-side benchmark, a training step eager against
# torch.compile with CUDA graphs (benchmarks/bench_compile.py), a torchrun-against-plain training check
# (30 epochs, median epoch rates), the data pipeline check (benchmarks/gpu_data_check.sh), and the
# torch.compile and per-loss variant benchmarks, within 575 s. Every step tees into
# $OUT/gpu_check.log; the JSON figures land in $OUT too, each rewritten after every row it
# measures (5 files, 8 with --all: the device returns at most 8). Each step has a time cap, cut to
# what is left of the total, and a failing step does not stop the ones after it, so a run always
# ends in time and returns its log.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh [--all]   # on the GPU machine, repository root
#   OUT=/tmp/dry bash benchmarks/gpu_check.sh --no-gpu   # dry run of the same steps on a CPU box
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:?set OUT to a folder for the log and the JSON files}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
NO_GPU=0
ALL=0
for arg in "$@"; do
  case "$arg" in
    --no-gpu) NO_GPU=1 ;;
    --all) ALL=1 ;;
    *) echo "unknown option $arg (use --no-gpu, --all)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
SUNCET=("$PY" -c "import sys; from suncet.cli.main import main; sys.exit(main())")
START=$SECONDS
TOTAL=480  # the kernel checks: at most 8 minutes
if ((ALL)); then TOTAL=575; fi  # the device stops a command at 600 s

failures=()

step() { printf '\n=== %s (%s, %ds in)\n' "$1" "$(date +%T)" $((SECONDS - START)) | tee -a "$LOG"; }

# run NAME LIMIT_SECONDS COMMAND...: records a failure or a timeout and carries on.
run() {
  local name="$1" limit="$2"
  shift 2
  local left=$((TOTAL - (SECONDS - START)))
  if ((left < 20)); then
    echo "--- skipped $name: ${left}s left of ${TOTAL}s" | tee -a "$LOG"
    failures+=("$name (skipped)")
    return
  fi
  if ((limit > left)); then limit=$left; fi
  if timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"; then
    return
  fi
  local rc=${PIPESTATUS[0]}
  echo "!!! $name failed (exit $rc$( ((rc == 124)) && echo ", over its ${limit}s cap"))" | tee -a "$LOG"
  failures+=("$name (exit $rc)")
}

step "machine"
if ((NO_GPU)); then
  run "cpu info" 10 bash -c "grep -m1 'model name' /proc/cpuinfo; nproc"
else
  run "nvidia-smi" 20 nvidia-smi -L
fi
run "versions" 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build (the CUDA kernels compile when a GPU is visible)"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
BUILD=("$PY" -m pip install --no-build-isolation --no-deps -e .)
if ((NO_GPU)); then
  run "build" 300 "${BUILD[@]}"
else
  ARCH=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
  run "build with CUDA (sm_$ARCH)" 150 "${BUILD[@]}" -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCH"
  if [[ " ${failures[*]} " == *"build with CUDA"* ]]; then
    # Keep the Triton checks alive even if the CUDA C++ kernels do not build.
    run "build without CUDA (fallback)" 120 env SUNCET_WITH_CUDA=OFF "${BUILD[@]}"
  fi
fi
run "doctor" 60 "${SUNCET[@]}" doctor

step "kernel tests (gpu-marked; one configuration per kernel, no autotuning)"
# pytest's exit code 5 (nothing selected) is not a failure here.
PYTEST=(bash -c '"$@"; rc=$?; ((rc == 5)) && exit 0; exit $rc' pytest "$PY" -m pytest -m gpu -q -rs)
run "kernel gpu tests" 100 env SUNCET_TRITON_AUTOTUNE=0 "${PYTEST[@]}" \
  tests/kernels/test_kernels.py tests/kernels/test_triton_launch.py
if ((ALL)); then
  run "other gpu tests" 120 "${PYTEST[@]}" --ignore=tests/kernels/test_kernels.py --ignore=tests/kernels/test_triton_launch.py tests
fi

step "kernel time of each Triton tile configuration against cuBLAS and flash attention, N = 8192"
if ((NO_GPU)); then
  echo "--- skipped on a CPU box (needs CUDA)" | tee -a "$LOG"
else
  run "kernel anatomy" 110 "$PY" benchmarks/kernel_anatomy.py --json "$OUT/kernel_anatomy.json"
fi

# The Triton backend alone by default (the cuda backend and eager PyTorch, already in
# benchmarks/results, take most of this step's time at N = 32768); all three with --all.
MAIN_BACKENDS=triton
if ((ALL)); then MAIN_BACKENDS=triton,cuda,reference; fi
step "benchmark: fused backends ($MAIN_BACKENDS), N = 8192 / 32768 / 2048 (the targets first), D = 128"
if ((NO_GPU)); then
  run "bench main" 200 "${SUNCET[@]}" bench kernels --device cpu --n 512 --d 64 --dtype fp32,bf16 \
    --backend cpu,triton,cuda,reference --loss both --repeats 3 --json "$OUT/bench_main.json"
else
  run "bench main" 100 "${SUNCET[@]}" bench kernels --n 8192,32768,2048 --d 128 --dtype bf16,fp32 \
    --backend "$MAIN_BACKENDS" --loss both --repeats 10 --cuda-graph --json "$OUT/bench_main.json"
fi

step "host time of a fused-loss step: real launches, then launches stubbed"
if ((NO_GPU)); then
  echo "--- real launches skipped on a CPU box (needs CUDA)" | tee -a "$LOG"
else
  PROFILE_JSON=(--json "$OUT/profile_host.json")
  if ((ALL)); then PROFILE_JSON=(); fi  # its figures stay in the log: --all fills the 8 files
  # Host time does not depend on the tile: the first entries, no autotuning.
  run "profile host" 45 env SUNCET_TRITON_AUTOTUNE=0 "$PY" benchmarks/profile_host.py --rounds 7 "${PROFILE_JSON[@]}"
fi
run "profile host, launches stubbed" 30 "$PY" benchmarks/profile_host.py --stub --rounds 7

step "PAWS's soft nearest neighbour: GEMMs + softmax against scaled_dot_product_attention, fp32 and bf16"
SNN_JSON=(--json "$OUT/bench_snn.json")
if ((ALL)); then SNN_JSON=(); fi  # in the log only: --all fills the 8 files
if ((NO_GPU)); then
  run "bench snn" 60 "${SUNCET[@]}" bench snn --device cpu --shape 256,40,64,10 --repeats 3 "${SNN_JSON[@]}"
else
  run "bench snn" 40 "${SUNCET[@]}" bench snn --dtype fp32,bf16 --repeats 10 "${SNN_JSON[@]}"
fi

if ((ALL)); then
step "training step under torch.compile: eager against CUDA graphs (reduce-overhead), host synced every 16 steps"
if ((NO_GPU)); then
  run "bench compile" 200 "$PY" benchmarks/bench_compile.py --epochs 2 --json "$(mktemp -d)/compile.json"
else
  run "bench compile" 150 "$PY" benchmarks/bench_compile.py --modes none,reduce-overhead --epochs 12 \
    --train-args "--backbone resnet18 --sync-every 16 --final-eval none" --json "$(mktemp -d)/compile.json"  # figures in the log: the device returns at most 8 files
fi

step "training: torchrun --nproc-per-node 1 equals a plain run; throughput of both paths"
TRAIN_ARGS=(train --dataset digits --backbone resnet18 --batch-size 128 --epochs 30 --labels 10%
            --monitor-every 0 --final-eval none --seed 0)
if ((NO_GPU)); then TRAIN_ARGS=(train --epochs 2 --monitor-every 0 --final-eval none --seed 0); fi
RUNS="$(mktemp -d)"
SCRIPT=$("$PY" -c "import os, sys; print(os.path.join(os.path.dirname(sys.executable), 'suncet'))")
# Plain, torchrun, plain again: a later process can run faster than an earlier one (GPU clocks,
# caches; docs/benchmarks.md), so the torchrun run is compared with both plain runs.
run "train plain" 80 "${SUNCET[@]}" "${TRAIN_ARGS[@]}" --out "$RUNS/plain"
run "train torchrun" 80 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 "$SCRIPT" \
  "${TRAIN_ARGS[@]}" --out "$RUNS/torchrun"
run "train plain again" 80 "${SUNCET[@]}" "${TRAIN_ARGS[@]}" --out "$RUNS/plain_again"
run "train compare" 20 env CHECK_THROUGHPUT=$((1 - NO_GPU)) "$PY" - "$OUT/train_check.json" \
  "$RUNS/plain/metrics.csv" "$RUNS/torchrun/metrics.csv" "$RUNS/plain_again/metrics.csv" <<'PYEOF'
import csv, json, os, statistics, sys
plain, launched, again = ([r for r in csv.DictReader(open(p))] for p in sys.argv[2:5])
timing = {"images_per_second", "train_seconds"}

def metrics(rows):
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]

# Median epoch rate after the first (cuDNN autotuning, allocator warm-up): an epoch is 11 steps,
# short, and its rate wanders from epoch to epoch (docs/benchmarks.md), so the median.
def rate(rows):
    return statistics.median(float(r["images_per_second"]) for r in rows[1:])

plain_rate = (rate(plain) + rate(again)) / 2
report = {"epochs": len(plain), "metrics_equal": metrics(plain) == metrics(launched) == metrics(again),
          "plain_images_per_s": rate(plain), "torchrun_images_per_s": rate(launched),
          "plain_again_images_per_s": rate(again), "torchrun_over_plain": rate(launched) / plain_rate}
print(json.dumps(report, indent=2))
json.dump(report, open(sys.argv[1], "w"), indent=2)
throughput_ok = abs(report["torchrun_over_plain"] - 1) <= 0.03 or os.environ["CHECK_THROUGHPUT"] == "0"
sys.exit(0 if report["metrics_equal"] and throughput_ok else 1)
PYEOF

step "data pipeline: crop check, suncet bench data, targets"
if ((NO_GPU)); then
  echo "--- skipped on a CPU box (the data benchmark has its own CPU figures: docs/data.md)" | tee -a "$LOG"
else
  run "data check" 260 env LOG="$LOG" bash benchmarks/gpu_data_check.sh
fi
fi

if ((ALL)); then
  step "benchmark: torch.compile of the reference, N = 8192, D = 128"
  if ((NO_GPU)); then
    run "bench compiled" 200 "${SUNCET[@]}" bench kernels --device cpu --n 256 --d 64 --dtype fp32 \
      --backend compiled,cpu --loss both --repeats 3 --json "$OUT/bench_compiled.json"
  else
    run "bench compiled" 70 "${SUNCET[@]}" bench kernels --n 8192 --d 128 --dtype bf16,fp32 \
      --backend compiled --loss both --repeats 20 --json "$OUT/bench_compiled.json"
  fi

  step "benchmark: one pass with two key sets against two launches, D = 256, per-loss figures"
  if ((NO_GPU)); then
    run "bench variants" 120 "${SUNCET[@]}" bench kernels --device cpu --n 512 --d 128 --dtype fp32 \
      --backend cpu --loss ntxent,suncet,both,both2 --repeats 3 --json "$OUT/bench_variants.json"
  else
    run "bench variants" 60 "${SUNCET[@]}" bench kernels --n 8192 --d 128,256 --dtype bf16 \
      --backend triton,cuda --loss ntxent,suncet,both,both2 --repeats 20 --cuda-graph \
      --json "$OUT/bench_variants.json"
  fi
fi

step "summary"
if ((${#failures[@]})); then
  printf 'failed or skipped: %s\n' "${failures[@]}" | tee -a "$LOG"
  exit 1
fi
echo "all steps passed in $((SECONDS - START))s" | tee -a "$LOG"
