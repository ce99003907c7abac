"""A corpus of hostile or mistaken inputs, tried as a user would: each must end in one line on
stderr naming what was wrong, exit code 2 (3 for non-finite weights), no traceback, and leave
every file outside the command's own run untouched and nothing old changed.

Most cases stop at validation and run in-process (click's runner); the rest build real files in
the formats suncet reads (YAML, label lists, checkpoints, metrics, run directories)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import SMALL, SUNCET, refused

FLOAT_FLAGS = [
    "--lr",
    "--start-lr",
    "--final-lr",
    "--warmup-epochs",
    "--weight-decay",
    "--momentum",
    "--tau",
    "--suncet-weight",
]
POSITIVE_INT_FLAGS = [
    "--epochs",
    "--batch-size",
    "--proj-hidden",
    "--proj-dim",
    "--knn-k",
    "--keep-checkpoints",
    "--sync-every",
    "--classes-per-step",
    "--images-per-class",
    "--lr-batch",
]
NON_NEGATIVE_INT_FLAGS = [
    "--monitor-every",
    "--probe-every",
    "--skip-nonfinite",
    "--label-seed",
    "--seed",
    "--num-workers",
]

# "Billion laughs": 9^9 strings from a few hundred bytes, all under one settings key.
BOMB = """epochs:
  - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
  - &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
  - &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
  - &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
  - &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
  - &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
  - &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
  - &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
  - [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""
BOMB_VALUE = "[" + ",".join(["[" + ",".join(["[" + ",".join(["lol"] * 9) + "]"] * 9) + "]"] * 9) + "]"


# --- numbers: non-finite, negative, out of range, too large -------------------------------------

NUMBER_CASES = (
    [(flag, value, f"{flag[2:]} must be") for flag in FLOAT_FLAGS for value in ("nan", "inf", "-inf", "-1")]
    + [(flag, value, f"{flag[2:]} must be") for flag in POSITIVE_INT_FLAGS for value in ("0", "-3", str(2**70))]
    + [(flag, value, f"{flag[2:]} must be") for flag in NON_NEGATIVE_INT_FLAGS for value in ("-1", str(2**64))]
    + [
        ("--momentum", "1.0", "momentum must be in [0, 1)"),
        ("--suncet-epochs", "-1", "suncet-epochs must be between"),
        ("--suncet-epochs", "2", "suncet-epochs must be between"),
    ]
)


@pytest.mark.parametrize("flag,value,message", NUMBER_CASES, ids=[f"{f}={v}" for f, v, _ in NUMBER_CASES])
def test_numbers_must_be_finite_and_in_range(tmp_path, flag, value, message):
    if value == "-1" and flag in ("--start-lr", "--final-lr"):
        message = f"{flag[2:]} must be >= 0"
    refused(tmp_path, ["train", *SMALL, f"{flag}={value}", "--out", str(tmp_path / "run")], message)


@pytest.mark.parametrize("flag", [*FLOAT_FLAGS, *POSITIVE_INT_FLAGS, *NON_NEGATIVE_INT_FLAGS])
def test_text_where_a_number_belongs(tmp_path, flag):
    refused(tmp_path, ["train", *SMALL, f"{flag}=abc", "--out", str(tmp_path / "run")], "Invalid value for")


# --- names and choices ---------------------------------------------------------------------------

CHOICE_CASES = [
    (["--backend", "gpu"], "unknown contrastive backend 'gpu'"),
    (["--backend", "x" * 5000], "unknown contrastive backend 'xxxxxxxx"),
    (["--compile", "max"], "compile must be one of"),
    (["--data-pipeline", "tpu"], "data-pipeline must be one of"),
    (["--label-loss", "mse"], "unknown label loss 'mse'; available: ce, suncet"),
    (["--final-eval", "all"], "final-eval must be one of"),
    (["--device", "cuda:abc"], "device must be auto, cpu, cuda or cuda:N"),
    (["--device", "tpu:0"], "device must be auto, cpu, cuda or cuda:N"),
    (["--device", ""], "device must be auto, cpu, cuda or cuda:N"),
    (["--checkpoint-every", "0epoch"], "checkpoint-every must be a positive count"),
    (["--checkpoint-every", "soon"], "checkpoint-every must be a positive count"),
    (["--labels", "0.0001%"], "selects none of the 1437 training images of digits"),
    (["--labels", "nan%"], "is not a label spec"),
    (["--labels", "1e400%"], "is not a label spec"),
    (["--labels", "3.5/class"], "label subset file 3.5/class does not exist"),
    (["--preset", "paper"], "unknown preset 'paper'"),
    (["--method", "x" * 5000], "unknown method 'xxxxxxxx"),
    (["--dataset", "../digits"], "unknown dataset '../digits'"),
    (["--backbone", "resnet1000"], "unknown backbone 'resnet1000'"),
    (["--optimizer", "adam"], "unknown optimizer 'adam'"),
]


@pytest.mark.parametrize("arguments,message", CHOICE_CASES, ids=[" ".join(a)[:30] for a, _ in CHOICE_CASES])
def test_names_and_choices(tmp_path, arguments, message):
    refused(tmp_path, ["train", *SMALL, *arguments, "--out", str(tmp_path / "run")], message)


# --- plugin options: methods, backbones, optimizers, datasets, augmentation ------------------------

OPTION_CASES = [
    (["--method-opt", "prototypes=3"], "unknown option 'prototypes' for method SimCLR"),
    (
        ["--method", "swav", "--method-opt", "temperature=nan"],
        "option temperature of method SwAV must be a finite float",
    ),
    (
        ["--method", "swav", "--method-opt", "temperature=inf"],
        "option temperature of method SwAV must be a finite float",
    ),
    (["--method", "swav", "--method-opt", "prototypes=abc"], "option prototypes of method SwAV must be int"),
    (["--method", "swav", "--method-opt", "prototypes=2.5"], "option prototypes of method SwAV must be int"),
    (["--method", "swav", "--method-opt", f"prototypes={2**80}"], "option prototypes of method SwAV must be int"),
    (
        ["--method", "swav", "--method-opt", f"local_crops={BOMB_VALUE}"],
        "option local_crops of method SwAV must be int",
    ),
    (["--method", "swav", "--method-opt", "sinkhorn_eps=0"], "swav options need"),
    (["--method", "byol", "--method-opt", "momentum=1.5"], "byol options need 0 <= momentum <= 1"),
    (["--method", "byol", "--method-opt", "predictor_hidden=-1"], "predictor_hidden >= 0"),
    (
        ["--method", "moco", "--method-opt", "queue_size=0"],
        "moco options need 0 <= momentum <= 1, temperature >= 0.001 and queue_size >= 1",
    ),
    (
        ["--method", "moco", "--method-opt", "temperature=nan"],
        "option temperature of method MoCo must be a finite float",
    ),
    (
        ["--method", "vicreg", "--method-opt", "std_coeff=-1"],
        "vicreg options need sim_coeff, std_coeff, cov_coeff >= 0",
    ),
    (["--method", "vicreg", "--method-opt", "expander_layers=0"], "expander_layers >= 1"),
    (["--method", "barlowtwins", "--method-opt", "lambd=-0.1"], "barlowtwins options need lambd >= 0"),
    (
        ["--method", "barlowtwins", "--method-opt", "redundancy_weight=0.1"],
        "unknown option 'redundancy_weight' for method BarlowTwins",
    ),
    (["--method", "dino", "--method-opt", "teacher_temp=0"], "dino options need"),
    (["--method-opt", "=3"], "unknown option '' for method SimCLR"),
    (["--backbone-opt", "width=abc"], "option width of backbone 'small_resnet' must be int"),
    (["--backbone-opt", "width=0"], "option width of backbone 'small_resnet' must be >= 1"),
    (["--backbone-opt", "width=nan"], "option width of backbone 'small_resnet' must be int"),
    (["--backbone-opt", f"width={2**70}"], "option width of backbone 'small_resnet' must be int"),
    (["--backbone-opt", "blocks=-1"], "option blocks of backbone 'small_resnet' must be >= 1"),
    (["--backbone-opt", "blocks=maybe"], "option blocks of backbone 'small_resnet' must be int"),
    (["--backbone", "resnet18"], "backbone 'resnet18' has no option 'width'; its options: cifar_stem"),
    (
        ["--optimizer-opt", "trust_coefficient=nan"],
        "option trust_coefficient of optimizer 'lars' must be a finite float",
    ),
    (["--optimizer-opt", "trust_coefficient=0"], "option trust_coefficient of optimizer 'lars' must be > 0"),
    (
        ["--optimizer-opt", "trust_coefficient=-inf"],
        "option trust_coefficient of optimizer 'lars' must be a finite float",
    ),
    (["--optimizer", "sgd", "--optimizer-opt", "nesterov=2"], "option nesterov of optimizer 'sgd' must be bool"),
    (
        ["--optimizer", "adamw", "--optimizer-opt", "beta2=1.5"],
        "option beta2 of optimizer 'adamw' must be >= 0 and <= 1",
    ),
    (["--optimizer", "adamw", "--optimizer-opt", "eps=0"], "option eps of optimizer 'adamw' must be > 0"),
    (["--dataset-opt", "root=/etc"], "dataset 'digits' has no option 'root'"),
    (["--augment", "color_strength=.nan"], "augment option color_strength must be a finite non-negative number"),
    (["--augment", "color_strength=.inf"], "augment option color_strength must be a finite non-negative number"),
    (["--augment", "flip_p=2"], "augment option flip_p is a probability"),
    (["--augment", "blur_sigma=[.nan, 1]"], "augment option blur_sigma must be a list of 2 finite numbers"),
    (["--augment", "global_crop_scale=[.nan, 1]"], "global_crop_scale must be [low, high]"),
    (["--augment", "global_crop_size=true"], "global_crop_size must be a positive integer"),
    (["--augment", f"global_crop_size={2**40}"], "global_crop_size must be a positive integer"),
    (["--augment", f"mean={BOMB_VALUE}"], "augment option mean must be a list of 3 finite numbers"),
]


@pytest.mark.parametrize("arguments,message", OPTION_CASES, ids=[" ".join(a)[:40] for a, _ in OPTION_CASES])
def test_plugin_options(tmp_path, arguments, message):
    refused(tmp_path, ["train", *SMALL, *arguments, "--out", str(tmp_path / "run")], message)


# --- settings files ------------------------------------------------------------------------------

YAML_CASES = [
    ("bomb.yaml", BOMB.encode(), "config key 'epochs' must be int"),
    ("binary.yaml", bytes(range(256)) * 4, "is not UTF-8 text"),
    ("latin1.yaml", "method: simclr # caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
    ("huge.yaml", b"# padding\n" * 200_000, "a settings file is at most 1 MiB"),
    ("object.yaml", b"epochs: !!python/object/apply:os.system ['touch pwned']\n", "is not valid YAML"),
    ("nan.yaml", b"lr: .nan\n", "lr must be > 0 and finite, got nan (from config file"),
    ("inf.yaml", b"tau: .inf\n", "tau must be > 0 and finite, got inf (from config file"),
    ("list.yaml", b"- epochs\n", "must hold a mapping of settings"),
    ("scalar.yaml", b"42\n", "must hold a mapping of settings"),
    ("unknown.yaml", b"epochz: 3\n", "unknown config file key 'epochz'"),
    ("type.yaml", b"batch_size: [64]\n", "config key 'batch_size' must be int"),
    ("options.yaml", b"method_options: [1, 2]\n", "config key 'method_options' must be dict"),
    ("seed.yaml", f"seed: {2**64}\n".encode(), "seed must be >= 0 and at most"),
    ("truncated.yaml", b"epochs: [1, 2\n", "is not valid YAML"),
    ("preset.yaml", b"preset: [digits]\n", "unknown preset ['digits']"),
]


@pytest.mark.parametrize("name,content,message", YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_settings_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    refused(tmp_path, ["train", "--config", str(tmp_path / name), "--out", str(tmp_path / "run")], message)
    assert not (tmp_path / "pwned").exists()


LABEL_FILE_CASES = [
    (b"\xff\xfe\x00binary", "is not UTF-8 text"),
    (b"1\n2\n2\n", "listed twice"),
    (b"1\n99999\n", "outside the training set"),
    (b"-4\n", "index -4 is outside the training set"),
    (b"x\n1\n", "is an index, but other lines are file names"),
    (b"1e3\n", "lists file names, but dataset digits has no file names"),
]


@pytest.mark.parametrize("content,message", LABEL_FILE_CASES, ids=[m[:20] for _, m in LABEL_FILE_CASES])
def test_label_files(tmp_path, content, message):
    (tmp_path / "subset.txt").write_bytes(content)
    refused(
        tmp_path, ["train", *SMALL, "--labels", str(tmp_path / "subset.txt"), "--out", str(tmp_path / "run")], message
    )


# --- run directories -----------------------------------------------------------------------------


def _fake_run(run: Path) -> None:
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("method: simclr\n")
    (run / "labels.txt").write_text("# labeled training indices for --labels 10%\n1\n")
    (run / "metrics.csv").write_text("epoch,loss\n1,2.0\n")


def test_out_must_not_be_empty_text(tmp_path):
    refused(tmp_path, ["train", *SMALL, "--out", ""], "--out must name a directory")


def test_out_must_not_be_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    refused(tmp_path, ["train", *SMALL, "--out", str(tmp_path / "notes.txt")], "is a file")


def test_out_must_not_be_someone_elses_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "checkpoints").mkdir()
    (tmp_path / "photos" / "metrics.csv").write_text("precious\n")
    refused(tmp_path, ["train", *SMALL, "--out", str(tmp_path / "photos")], "is not empty and holds no suncet run")


def test_existing_run_needs_overwrite(tmp_path):
    _fake_run(tmp_path / "run")
    refused(tmp_path, ["train", *SMALL, "--out", str(tmp_path / "run")], "already holds a run")


def test_overwrite_with_a_bad_flag_deletes_nothing(tmp_path):
    _fake_run(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step-000000001.pt").write_bytes(b"old")
    refused(tmp_path, ["train", *SMALL, "--overwrite", "--tau", "nan", "--out", str(tmp_path / "run")], "tau must be")


@pytest.mark.parametrize("linked", ["labels.txt", "metrics.csv", "checkpoints", "config.yaml"])
def test_symlinked_run_files_are_refused(tmp_path, linked):
    _fake_run(tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("not yours")
    target = tmp_path / "run" / linked
    if target.is_dir():
        target.rmdir()
    else:
        target.unlink(missing_ok=True)
    target.symlink_to(outside if linked == "checkpoints" else outside / "victim")
    refused(tmp_path, ["train", *SMALL, "--overwrite", "--out", str(tmp_path / "run")], "is a symbolic link")
    refused(tmp_path, ["train", "--resume", str(tmp_path / "run")], "is a symbolic link")


def test_symlinked_checkpoint_inside_the_run_is_refused(tmp_path):
    _fake_run(tmp_path / "run")
    (tmp_path / "elsewhere.pt").write_bytes(b"theirs")
    (tmp_path / "run" / "checkpoints" / "step-000000001.pt").symlink_to(tmp_path / "elsewhere.pt")
    refused(tmp_path, ["train", "--resume", str(tmp_path / "run")], "is a symbolic link")


RESUME_CASES = [
    (["--resume", "{tmp}/missing"], "no such run directory"),
    (["--resume", "{tmp}/run", "--epochs", "3"], "give no other settings with it"),
    (["--resume", "{tmp}/run", "--print-config"], "give no other settings with it"),
    (["--resume", "auto"], "--resume auto needs --out RUN_DIR"),
    (["--resume", "{tmp}/plain"], "is not a run directory"),
    (["--nnodes", "2"], "--nnodes only sizes --print-config"),
    (["--nproc-per-node", "2", "--tau", "nan"], "tau must be > 0 and finite"),
    (["--nproc-per-node", "2", "--backbone-opt", "width=abc"], "option width of backbone 'small_resnet' must be int"),
    (["--nproc-per-node", "2", "--out", "{tmp}/run"], "already holds a run"),
]


@pytest.mark.parametrize("arguments,message", RESUME_CASES, ids=[" ".join(a)[:30] for a, _ in RESUME_CASES])
def test_resume_mistakes(tmp_path, arguments, message):
    _fake_run(tmp_path / "run")
    (tmp_path / "plain").mkdir()
    refused(tmp_path, ["train", *(a.replace("{tmp}", str(tmp_path)) for a in arguments)], message)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x00\x01binary", "is not valid YAML"),
        (b"\xc3\x28 invalid", "is not UTF-8 text"),
        (b"epochs: [1\n", "is not valid YAML"),
        (b"kernel_size: 3\n", "unknown key 'kernel_size'"),
        (b"tau: .nan\n", "tau must be > 0 and finite"),
    ],
)
def test_resume_with_a_broken_saved_config(tmp_path, content, message):
    _fake_run(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_bytes(content)
    refused(tmp_path, ["train", "--resume", str(tmp_path / "run")], message)


# --- environment variables -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "env,message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "not started by torchrun"),
        ({"WORLD_SIZE": "8"}, "not started by torchrun"),
        ({"RANK": "5", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"}, "RANK < WORLD_SIZE"),
        ({"RANK": "a", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"}, "must be integers"),
    ],
)
def test_stale_distributed_variables_fail_at_once(tmp_path, env, message):
    refused(tmp_path, ["train", *SMALL, "--out", str(tmp_path / "run")], message, env=env)


# --- evaluation, comparison and sweeps of hand-made files ---------------------------------------


class _WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _run_with_checkpoint(run: Path, payload) -> None:
    _fake_run(run)
    torch.save(payload, run / "checkpoints" / "last.pt")


def test_checkpoint_with_code_is_refused_and_never_run(tmp_path):
    victim = tmp_path / "created-by-payload"
    _run_with_checkpoint(tmp_path / "run", {"model": _WritesAFile(str(victim)), "config": {}})
    refused(tmp_path, ["eval", str(tmp_path / "run")], "cannot be read")
    assert not victim.exists()


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"PK\x03\x04 not a zip", "cannot be read"),
        (b"", "cannot be read"),
    ],
)
def test_garbage_checkpoints(tmp_path, payload, message):
    _fake_run(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(payload)
    refused(tmp_path, ["eval", str(tmp_path / "run")], message)


def test_checkpoint_that_is_not_a_suncet_checkpoint(tmp_path):
    _run_with_checkpoint(tmp_path / "run", {"weights": torch.zeros(3)})
    refused(tmp_path, ["eval", str(tmp_path / "run")], "is not a suncet training checkpoint")


METRICS_CASES = [
    (b"epoch,images_seen,train_seconds,knn_top1\n1,10,1.0,nan\n", "is not finite"),
    (b"epoch,images_seen,train_seconds,knn_top1\n1,10,1.0,0.5\n2,20,2.0,inf\n", "is not finite"),
    (b"epoch,images_seen,train_seconds,knn_top1\n1,ten,1.0,0.5\n", "expected numbers in epoch"),
    (b"epoch,knn_top1\n1,0.5\n", "expected numbers in epoch"),
    (b"\xff\xfe\x00\x01", "is not a metrics file written by suncet"),
    (b"epoch,images_seen\n", "has no knn_top1 values"),
]


@pytest.mark.parametrize(
    "content,message", METRICS_CASES, ids=[m[:20] + str(i) for i, (_, m) in enumerate(METRICS_CASES)]
)
def test_compare_hand_made_metrics(tmp_path, content, message):
    _fake_run(tmp_path / "run")
    (tmp_path / "run" / "metrics.csv").write_bytes(content)
    refused(tmp_path, ["compare", str(tmp_path / "run")], message)


SWEEP_CASES = [
    (BOMB.replace("epochs:", "grid:").encode(), "'grid' must map config keys to non-empty lists"),
    (
        b"grid: {epochs: [1]}\nbase:\n" + BOMB.replace("epochs:", "  tau:").replace("\n  -", "\n    -").encode(),
        "config key 'tau' must be float",
    ),
    (b"grid: {epochs: 3}\n", "'grid' must map config keys to non-empty lists"),
    (b"grid: {epochs: [1]}\nvariants: 3\n", "'variants' must be a list of mappings"),
    (b"grid: {epochs: [1]}\nbase: {tau: .nan}\n", "tau must be > 0 and finite"),
    (b"grid: {epochz: [1]}\n", "'epochz' is not a config key"),
    (b"\xff\xfe", "is not UTF-8 text"),
    (b"grid: {epochs: [1]}\nsurprise: 1\n", "unknown sweep key 'surprise'"),
]


@pytest.mark.parametrize("content,message", SWEEP_CASES, ids=[m[:24] for _, m in SWEEP_CASES])
def test_sweep_files(tmp_path, content, message):
    (tmp_path / "sweep.yaml").write_bytes(content)
    refused(tmp_path, ["sweep", str(tmp_path / "sweep.yaml"), "--dry-run"], message)


def test_eval_refuses_zero_labels_instead_of_borrowing_all(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [SUNCET, "train", *SMALL, "--final-eval", "linear", "--labels", "0%", "--out", str(run)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "no labeled images" in result.stdout and not list(run.glob("eval_*.json"))
    refused(tmp_path, ["eval", str(run), "--labels", "0%"], "evaluation needs labeled images")


def test_eval_of_non_finite_weights_says_so(tmp_path):
    run = tmp_path / "run"
    assert subprocess.run([SUNCET, "train", *SMALL, "--out", str(run)], capture_output=True).returncode == 0
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    next(v for v in state["model"].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(state, run / "checkpoints" / "last.pt")
    refused(tmp_path, ["eval", str(run)], "are not finite", code=3)


def test_a_second_training_into_the_same_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [SUNCET, "train", *SMALL, "--epochs", "50", "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):
            if (run / "config.yaml").exists():
                break
            assert first.poll() is None, first.communicate()
            import time

            time.sleep(0.1)
        second = subprocess.run([SUNCET, "train", "--resume", str(run)], capture_output=True, text=True)
        assert second.returncode == 2 and f"is in use by process {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()


def test_a_full_disk_is_named_with_the_path_and_keeps_the_old_file(tmp_path):
    import errno

    from suncet.engine.files import DiskFullError, write_atomic

    target = tmp_path / "metrics.csv"
    target.write_text("old\n")

    def fills_the_disk(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"no space left on device while writing {target}"):
        write_atomic(target, fills_the_disk)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_unreadable_checkpoints_are_kept_aside_not_deleted(tmp_path):
    from suncet.engine.state import newest_loadable

    (tmp_path / "step-000000002.pt").write_bytes(b"truncated")
    torch.save({"model": {}, "config": {}}, tmp_path / "step-000000001.pt")
    reports = []
    path, _ = newest_loadable(tmp_path, reports.append, set_aside=True)
    assert path.name == "step-000000001.pt" and (tmp_path / "step-000000002.pt.unreadable").read_bytes() == b"truncated"
    assert "kept as step-000000002.pt.unreadable" in reports[0]
