#!/usr/bin/env bash
# One-call device check of the data pipeline on an H100/H200, under 4.5 minutes, nothing
# downloaded (the CIFAR-format and JPEG files it times are written by the benchmark itself):
#   1. the device path's crops on CUDA (PyTorch and Triton) equal torchvision's resized_crop, and
#      its views stay in range;
#   2. `suncet bench data` at 32 px with the SimCLR ResNet-18 steps on CIFAR-format files
#      against synthetic views, then (another process) at 224 px with JPEG decoding on CPU and
#      with nvJPEG: torchvision per image, BatchAugment on the GPU (its Triton kernels and its
#      PyTorch operations; kornia when importable), the pipelines;
#   3. the targets: GPU augmentation >= 1,000,000 views/s at 32 px and >= 50,000 at 224 px,
#      the real-data SimCLR step >= 85% of the synthetic-data step rate.
# Needs the package installed (benchmarks/gpu_check.sh builds it first, then calls this).
# Writes $OUT/bench_data.json (both processes' figures) and $OUT/data_checks.json (the crop check and the targets), and
# appends its output to $LOG (default $OUT/data_gpu_check.log).
#
#   OUT=/some/dir bash benchmarks/gpu_data_check.sh     # on the GPU machine, repository root
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:?set OUT to a folder for the log and the JSON files}"
mkdir -p "$OUT"
LOG="${LOG:-$OUT/data_gpu_check.log}"
PY="${PYTHON:-python3}"
status=0
CHECKS="$(mktemp -d)"

{ nvidia-smi -L; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee -a "$LOG"

echo "=== crop check on CUDA" | tee -a "$LOG"
timeout --foreground 45 "$PY" - "$CHECKS/crop.json" <<'EOF' 2>&1 | tee -a "$LOG" || status=1
import json, sys, torch
from torchvision.transforms.v2 import functional as TF
from suncet.data.augment import BatchAugment, crop_resize_flip, sample_crop_boxes, triton_augment_usable
from suncet.data.recipe import VIEW_COLUMNS, ViewColumn
from suncet.plugins.datasets import imagefolder

cuda = torch.device("cuda")
g = torch.Generator(cuda).manual_seed(0)
images = torch.rand(64, 3, 256, 256, device=cuda, generator=g)
boxes = sample_crop_boxes(64, 256, 256, (0.08, 1.0), (3 / 4, 4 / 3), g, cuda)
flip = torch.arange(64, device=cuda) % 2 == 0
result = {}
for size in (32, 96, 224):
    views = crop_resize_flip(images, boxes, flip, size).cpu()
    worst = 0.0
    for i, (top, left, h, w) in enumerate(boxes.long().tolist()):
        expected = TF.resized_crop(images[i].cpu(), top, left, h, w, [size, size], antialias=True)
        expected = expected.flip(-1) if flip[i] else expected
        worst = max(worst, (views[i] - expected).abs().max().item())
    result[f"crop_max_abs_error_{size}px"] = worst
if triton_augment_usable(cuda):  # the Triton crop of the default CUDA path, from uint8 images
    from suncet.data.augment_triton import crop_views

    uint8_images = (images * 255).round().to(torch.uint8)
    params = torch.zeros(64, VIEW_COLUMNS, device=cuda)
    params[:, ViewColumn.TOP : ViewColumn.WIDTH + 1] = boxes
    params[:, ViewColumn.FLIP] = flip.float()
    for size in (32, 96, 224):
        views = crop_views(uint8_images, params, size).cpu()
        worst = 0.0
        for i, (top, left, h, w) in enumerate(boxes.long().tolist()):
            expected = TF.resized_crop(uint8_images[i].cpu().float() / 255, top, left, h, w, [size, size], antialias=True)
            expected = expected.flip(-1) if flip[i] else expected
            worst = max(worst, (views[i] - expected).abs().max().item())
        result[f"triton_crop_max_abs_error_{size}px"] = worst
recipe = imagefolder.RECIPE
uint8 = torch.randint(0, 256, (256, 3, 256, 256), dtype=torch.uint8, device=cuda)
views = BatchAugment(recipe, recipe.global_crop)(uint8, g)
low = min((0 - m) / s for m, s in zip(recipe.mean, recipe.std))
high = max((1 - m) / s for m, s in zip(recipe.mean, recipe.std))
result["views_finite"] = bool(torch.isfinite(views).all())
result["views_in_range"] = bool(views.min() >= low - 1e-4 and views.max() <= high + 1e-4)
print(json.dumps(result, indent=2))
json.dump(result, open(sys.argv[1], "w"), indent=2)
sys.exit(0 if result["views_finite"] and result["views_in_range"] and max(v for k, v in result.items() if "crop" in k) < 1e-3 else 1)
EOF

KORNIA=--no-kornia
if "$PY" -c "import kornia" 2>/dev/null; then KORNIA=--kornia; fi
# bench LIMIT ARGS...: `suncet bench data` that, if still running after LIMIT seconds, prints every
# thread's stack and exits (the 224 px stage of the H200 run of 2026-11-28 did not finish, and a
# plain timeout said nothing about where). Each figure lands in its JSON as it is measured, and
# after each process the figures of both go into $OUT/bench_data.json (the device returns at most
# 8 files), so a check cut short by gpu_check.sh's cap keeps what was measured. The timeouts run
# in the foreground, so that the outer cap's signal reaches their commands.
bench() {
  local limit="$1"
  shift
  timeout --foreground --kill-after=10 $((limit + 10)) "$PY" -c "import faulthandler, sys; faulthandler.dump_traceback_later($limit, exit=True)
from suncet.cli.main import main; sys.exit(main())" bench data --device cuda "$@" 2>&1 | tee -a "$LOG" || status=1
  "$PY" - "$OUT/bench_data.json" "$CHECKS"/bench_data_*.json <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys

reports = []
for path in sys.argv[2:]:
    try:
        reports.append(json.load(open(path)))
    except (OSError, ValueError) as exc:
        print(f"skipped {path}: {exc}")
if reports:
    figures = [f for report in reports for f in report["figures"]]
    json.dump({"machine": reports[0]["machine"], "figures": figures}, open(sys.argv[1], "w"), indent=2)
EOF
}
echo "=== suncet bench data, 32 px and the SimCLR steps" | tee -a "$LOG"
bench 100 --resolution 32 --workers 4 --steps 2 --seconds 0.3 --decode-files 0 --train-steps 16 $KORNIA \
  --json "$CHECKS/bench_data_32.json"
echo "=== suncet bench data, 224 px and JPEG decoding" | tee -a "$LOG"
bench 70 --resolution 224 --workers 8 --steps 1 --seconds 0.3 --decode-files 16 --no-train $KORNIA \
  --json "$CHECKS/bench_data_224.json"

echo "=== targets" | tee -a "$LOG"
timeout --foreground 20 "$PY" - "$CHECKS/targets.json" "$OUT/bench_data.json" <<'EOF' 2>&1 | tee -a "$LOG" || status=1
import json, os, sys

figures = json.load(open(sys.argv[2]))["figures"] if os.path.exists(sys.argv[2]) else []

def rate(measurement, path, resolution=None):
    found = [f["rate"] for f in figures
             if f["measurement"] == measurement and f["path"] == path and resolution in (None, f["resolution"])]
    return found[0] if found else None

def ratio(a, b):
    return None if a is None or b is None else a / b

targets = {
    "gpu_augment_32px_views_per_s": [rate("augment", "device (cuda)", 32), 1_000_000],
    "gpu_augment_224px_views_per_s": [rate("augment", "device (cuda)", 224), 50_000],
    "simclr_real_over_synthetic": [ratio(rate("train", "device pipeline, CIFAR-format files"),
                                         rate("train", "synthetic views on the device")), 0.85],
}
report = {name: {"measured": value, "target": target, "met": value is not None and value >= target}
          for name, (value, target) in targets.items()}
for resolution in (32, 224):  # what the Triton kernels bring over the PyTorch operations (no target)
    report[f"triton_over_pytorch_ops_{resolution}px"] = {
        "measured": ratio(rate("augment", "device (cuda)", resolution), rate("augment", "device (cuda, PyTorch ops)", resolution))}
print(json.dumps(report, indent=2))
json.dump(report, open(sys.argv[1], "w"), indent=2)
sys.exit(0 if all(r.get("met", True) for r in report.values()) else 1)
EOF
"$PY" -c "import json, sys; json.dump({k: json.load(open(f'$CHECKS/{k}.json')) for k in ('crop', 'targets') if __import__('os').path.exists(f'$CHECKS/{k}.json')}, open('$OUT/data_checks.json', 'w'), indent=2)"
echo "exit status $status" | tee -a "$LOG"
exit $status
