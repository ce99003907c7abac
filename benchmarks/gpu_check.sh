#!/usr/bin/env bash
# One-call device check of the fused contrastive kernels on an H100/H200: build the extension
# with CUDA, run the gpu-marked tests, time every backend against PyTorch eager and
# torch.compile of the reference. Every step tees into $OUT/gpu_check.log; the JSON figures and
# the pytest report land in $OUT too. Each step has a time cap and a failing step does not stop
# the ones after it, so a run always returns its log; the whole stays under ~7.5 minutes.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh           # on the GPU machine, repository root
#   OUT=/tmp/dry bash benchmarks/gpu_check.sh --no-gpu   # dry run of the same steps on a CPU box
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:?set OUT to a folder for the log and the JSON files}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
NO_GPU=0
if [[ "${1:-}" == "--no-gpu" ]]; then NO_GPU=1; fi
PY="${PYTHON:-python3}"
SUNCET=("$PY" -c "import sys; from suncet.cli.main import main; sys.exit(main())")
START=$SECONDS
DEADLINE=450  # seconds after which the remaining steps are skipped
failures=()

step() { printf '\n=== %s (%s, %ds in)\n' "$1" "$(date +%T)" $((SECONDS - START)) | tee -a "$LOG"; }

# run NAME LIMIT_SECONDS COMMAND...: records a failure or a timeout and carries on.
run() {
  local name="$1" limit="$2"
  shift 2
  if ((SECONDS - START > DEADLINE)); then
    echo "--- skipped $name: past the ${DEADLINE}s deadline" | tee -a "$LOG"
    failures+=("$name (skipped)")
    return
  fi
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
  run "build with CUDA (sm_$ARCH)" 200 "${BUILD[@]}" -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCH"
  if [[ " ${failures[*]} " == *"build with CUDA"* ]]; then
    # Keep the Triton checks alive even if the CUDA C++ kernels do not build.
    run "build without CUDA (fallback)" 120 env SUNCET_WITH_CUDA=OFF "${BUILD[@]}"
  fi
fi
run "doctor" 60 "${SUNCET[@]}" doctor

step "kernel tests (gpu-marked; one configuration per kernel, no autotuning)"
# pytest's exit code 5 (nothing selected) is not a failure here.
PYTEST=(bash -c '"$@"; rc=$?; ((rc == 5)) && exit 0; exit $rc' pytest "$PY" -m pytest -m gpu -q -rs)
run "kernel gpu tests" 120 env SUNCET_TRITON_AUTOTUNE=0 "${PYTEST[@]}" \
  --junitxml="$OUT/pytest_kernels_gpu.xml" tests/test_kernels.py
run "other gpu tests" 60 "${PYTEST[@]}" --junitxml="$OUT/pytest_other_gpu.xml" --ignore=tests/test_kernels.py tests

step "benchmark: fused backends against eager, N = 2048 / 8192 / 32768, D = 128"
if ((NO_GPU)); then
  run "bench main" 200 "${SUNCET[@]}" bench kernels --device cpu --n 512 --d 64 --dtype fp32,bf16 \
    --backend cpu,triton,cuda,reference --loss both --repeats 3 --json "$OUT/bench_main.json"
else
  run "bench main" 110 "${SUNCET[@]}" bench kernels --n 2048,8192,32768 --d 128 --dtype bf16,fp32 \
    --backend triton,cuda,reference --loss both --repeats 20 --cuda-graph --json "$OUT/bench_main.json"
fi

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

step "summary"
if ((${#failures[@]})); then
  printf 'failed or skipped: %s\n' "${failures[@]}" | tee -a "$LOG"
  exit 1
fi
echo "all steps passed in $((SECONDS - START))s" | tee -a "$LOG"
