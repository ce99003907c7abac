"""Every kind of bad input gets one clear line naming the option, exit code 2, and no run touched."""

from __future__ import annotations

import os
import pickle

import pytest
from click.testing import CliRunner

from suncet.bench.data import write_cifar_files
from suncet.cli.main import main

SMALL = {"--batch-size": "64", "--proj-hidden": "64", "--epochs": "1", "--final-eval": "none"}


def files(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: [1, 2\n")
    (tmp_path / "unknown.yaml").write_text("epochz: 3\n")
    (tmp_path / "wrongtype.yaml").write_text("epochs: many\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "labels.txt").write_text("1\n99999\n")
    return tmp_path


CASES = [
    # (arguments, expected text in the message)
    (["--labels", "150%"], "--labels 150%: a percentage must be between 0% and 100%"),
    (["--labels", "-1%"], "--labels '-1%' is not a label spec"),
    (["--labels", "abc"], "--labels 'abc' is not a label spec"),
    (["--labels", "500/class"], "class 0 has only"),
    (["--labels", "0/class"], "the count per class must be at least 1"),
    (["--labels", "{tmp}/missing.txt"], "missing.txt does not exist"),
    (["--labels", "{tmp}/labels.txt"], "index 99999 is outside the training set"),
    (["--method", "nope"], "unknown method 'nope'; available:"),
    (["--dataset", "nope"], "unknown dataset 'nope'; available:"),
    (["--backbone", "nope"], "unknown backbone 'nope'; available:"),
    (["--optimizer", "nope"], "unknown optimizer 'nope'; available:"),
    (["--preset", "nope"], "unknown preset 'nope'; available:"),
    (["--epochs", "0"], "epochs must be > 0"),
    (["--epochs", "abc"], "'abc' is not a valid integer"),
    (["--batch-size", "0"], "batch-size must be > 0"),
    (
        ["--batch-size", "5000"],
        "--batch-size 5000 is more than the 1437 unlabeled images of digits; at most 1437 works",
    ),
    (["--tau", "0"], "tau must be > 0"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--momentum", "1.5"], "momentum must be in [0, 1)"),
    (["--weight-decay", "-1"], "weight-decay must be >= 0"),
    (["--suncet-weight", "-1"], "suncet-weight must be >= 0"),
    (["--suncet-epochs", "500"], "suncet-epochs must be between 0 and epochs"),
    (
        ["--classes-per-step", "20"],
        "--classes-per-step 20 is more than the 10 classes with labeled images in digits; at most 10 works",
    ),
    (["--logger", "nope"], "unknown logger 'nope'; available:"),
    (
        ["--images-per-class", "0"],
        "images-per-class must be > 0 and at most 9223372036854775807, got 0 (from --images-per-class)",
    ),
    (["--proj-dim", "0"], "proj-dim must be > 0"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--backend", "nope"], "unknown contrastive backend 'nope'"),
    (["--compile", "max"], "compile must be one of none, default, reduce-overhead"),
    (["--sync-every", "0"], "sync-every must be > 0"),
    (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["--final-eval", "nope"], "final-eval must be one of"),
    (["--checkpoint-every", "5parsecs"], "checkpoint-every must be a positive count"),
    (["--keep-checkpoints", "0"], "keep-checkpoints must be > 0"),
    (["--skip-nonfinite", "-2"], "skip-nonfinite must be >= 0"),
    (["--method-opt", "foo=1"], "unknown option 'foo' for method SimCLR"),
    (["--method-opt", "foo"], "--method-opt expects KEY=VALUE"),
    (["--backbone-opt", "depth=3"], "backbone 'small_resnet' has no option 'depth'; its options: width, blocks"),
    (["--optimizer-opt", "nesterov=true"], "optimizer 'lars' has no option 'nesterov'"),
    (["--augment", "global_crop_scale=[0,2]"], "global_crop_scale must be [low, high]"),
    (["--augment", "sparkle=1"], "unknown augment option 'sparkle'"),
    (["--config", "{tmp}/missing.yaml"], "missing.yaml does not exist"),
    (["--config", "{tmp}/bad.yaml"], "bad.yaml is not valid YAML"),
    (["--config", "{tmp}/unknown.yaml"], "unknown config file key 'epochz'"),
    (["--config", "{tmp}/wrongtype.yaml"], "config key 'epochs' must be int, got 'many'"),
    (["--config", "{tmp}/list.yaml"], "must hold a mapping of settings"),
    (["--resume", "{tmp}/nothing-here"], "no such run directory"),
    (["--resume", "{tmp}", "--epochs", "3"], "--resume RUN_DIR continues a run with its saved config"),
    (["--resume", "auto"], "--resume auto needs --out RUN_DIR"),
    (["--method", "supervised", "--labels", "0%"], "trains on labeled images, but --labels 0% selects none"),
    (["--dataset", "cifar10", "--data", "{tmp}/nothing"], "no cifar10 data in {tmp}/nothing: expected"),
    (["--dataset", "stl10", "--data", "{tmp}"], "no STL-10 data in {tmp}: expected"),
    (["--dataset", "imagefolder"], "dataset imagefolder needs --data DIR"),
    (["--dataset-opt", "size=3"], "dataset 'digits' has no option 'size'"),
    (["--data-pipeline", "gpu"], "data-pipeline must be one of device, workers"),
    (["--num-workers", "-1"], "num-workers must be >= 0"),
]


@pytest.mark.parametrize("arguments,message", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_bad_train_input(tmp_path, arguments, message):
    files(tmp_path)
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    if "--resume" not in args:
        defaults = {} if "--config" in args else SMALL  # flags would override the file's values
        args = [*(x for k, v in defaults.items() if k not in args for x in (k, v)), *args, "--out", str(out)]
    result = CliRunner().invoke(main, ["train", *args])
    stderr = result.stderr
    assert result.exit_code == 2, (result.exit_code, stderr, result.output)
    assert message.replace("{tmp}", str(tmp_path)) in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_run_directory_is_left_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: simclr\n")
    (run / "labels.txt").write_text("# labeled training indices for --labels 10%\n1\n")
    result = CliRunner().invoke(main, ["train", *(x for kv in SMALL.items() for x in kv), "--out", str(run)])
    assert result.exit_code == 2 and "already holds a run" in result.stderr
    assert (run / "config.yaml").read_text() == "method: simclr\n"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "labels.txt"]


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["eval", "{tmp}/nothing"], "is not a run directory"),
        (["eval", "{tmp}", "--protocol", "nope"], "'nope' is not one of"),
    ],
)
def test_bad_eval_input(tmp_path, arguments, message):
    result = CliRunner().invoke(main, [a.replace("{tmp}", str(tmp_path)) for a in arguments])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr


class _RunsShell:
    """A pickle payload: unpickling it runs ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar_pickle_with_code_is_one_line_and_never_run(tmp_path):
    write_cifar_files(tmp_path, images=50)
    marker = tmp_path / "created-by-the-pickle"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as handle:
        pickle.dump({"labels": [0], "data": _RunsShell(f"touch {marker}")}, handle, protocol=2)
    out = tmp_path / "out"
    args = [
        *(x for kv in SMALL.items() for x in kv),
        "--dataset",
        "cifar10",
        "--data",
        str(tmp_path),
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert f"{batch} is not a CIFAR python pickle: it asks for" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not out.exists()
