"""Hostile and careless inputs to exports, runs, resumes, settings files, image folders and
signals. Each refusal is checked as in test_hostile_inputs.py (the exit code, one line naming what
was wrong, no traceback, and every file under the test's folder unchanged); the cases that must
succeed check that nothing they did not write is deleted or replaced."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import SMALL, SUNCET, refused, snapshot

from suncet.cli.main import main

TINY = [*SMALL, "--labels", "10%"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One small finished run; each test works on its own copy."""
    run = tmp_path_factory.mktemp("trained") / "run"
    done = suncet("train", *TINY, "--monitor-every", "1", "--out", str(run))
    assert done.returncode == 0, done.stderr
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def suncet(*arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed command in its own process, its lines unwrapped."""
    return subprocess.run(
        [SUNCET, *arguments], capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "1000"}
    )


def invoke(tmp_path: Path, arguments: list[str]):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return CliRunner().invoke(main, arguments)
    finally:
        os.chdir(cwd)


# --- data loss: nothing deleted that suncet did not write -----------------------------------------


def test_resume_auto_refuses_a_folder_with_only_a_checkpoints_subfolder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "holiday.jpg").write_bytes(b"precious")
    (folder / ".notes.tmp-12345678").write_text("a hidden file that looks temporary")
    refused(
        tmp_path, ["train", *SMALL, "--out", str(folder), "--resume", "auto"], "is not empty and holds no suncet run"
    )


def test_resume_auto_on_a_run_whose_only_checkpoint_is_unreadable_keeps_it_and_the_old_results(run, tmp_path):
    for old in (run / "checkpoints").iterdir():
        old.unlink()
    (run / "checkpoints" / "step-000000004.pt").write_bytes(b"truncated")
    (run / "eval_linear.json").write_text('{"top1": 0.5}\n')
    (run / ".notes.txt.tmp-abc").write_text("not a name suncet writes")
    before = snapshot(run)
    done = suncet("train", *TINY, "--out", str(run), "--resume", "auto")
    assert done.returncode == 0, done.stderr
    aside = next(run.glob("replaced-*"))
    assert "kept as step-000000004.pt.unreadable" in done.stdout and f"moved what {run} held to {aside}" in done.stdout
    assert (aside / "checkpoints" / "step-000000004.pt.unreadable").read_bytes() == b"truncated"
    assert (aside / "eval_linear.json").read_text() == '{"top1": 0.5}\n'
    moved = {k.split("/", 1)[1] for k in snapshot(run) if k.startswith(aside.name + "/")}
    assert {k for k in before if k != ".lock"} - {"checkpoints/step-000000004.pt"} <= moved


def test_overwrite_moves_the_earlier_run_aside(run, tmp_path):
    (run / "notes.txt").write_text("mine")
    before = {k: v for k, v in snapshot(run).items() if k != ".lock"}
    done = suncet("train", *TINY, "--out", str(run), "--overwrite")
    assert done.returncode == 0, done.stderr
    aside = next(run.glob("replaced-*"))
    after = snapshot(run)
    assert all(after[f"{aside.name}/{k}"] == v for k, v in before.items())  # byte for byte, nothing lost
    listed = suncet("runs", str(tmp_path), "--json")
    assert [Path(r["run"]).name for r in json.loads(listed.stdout)] == ["run"]  # the set-aside run is not a run


def test_a_hidden_file_shaped_like_a_temporary_one_is_not_removed_on_resume(run, tmp_path):
    (run / ".notes.txt.tmp-12345678").write_text("a user's file")
    (run / ".metrics.csv.tmp-abcdefgh").write_text("half a row")  # suncet's own interrupted write
    done = suncet("train", "--resume", str(run))
    assert done.returncode == 0, done.stderr
    assert (run / ".notes.txt.tmp-12345678").read_text() == "a user's file"
    assert not (run / ".metrics.csv.tmp-abcdefgh").exists() and "left by an interrupted write" in done.stdout


EXPORT_PATH_CASES = [
    (["--out", "{run}/backbone.safetensors"], "exists; choose another file or add --overwrite"),
    (["--out", "{other}/checkpoints/last.pt", "--overwrite"], "is inside another run directory"),
    (["--out", "{other}/new.safetensors"], "is inside another run directory"),
    (["--out", "{run}/checkpoints/last.pt", "--overwrite"], "is one of the run's own files or folders"),
    (["--out", "{run}/config.yaml", "--overwrite"], "is one of the run's own files or folders"),
    (["--out", ""], "--out must name a file"),
    (["--out", "{tmp}"], "is a directory; name a file"),
    (["--out", "{tmp}/link.pt", "--overwrite"], "is a symbolic link"),
    (["--format", "torchvision", "--out", "{tmp}/victim.txt"], "exists; choose another file"),
]


@pytest.mark.parametrize(
    "arguments,message", EXPORT_PATH_CASES, ids=[m[:30] + str(i) for i, (_, m) in enumerate(EXPORT_PATH_CASES)]
)
def test_export_never_replaces_or_writes_into_runs(run, tmp_path, arguments, message):
    (run / "backbone.safetensors").write_bytes(b"an earlier export")
    shutil.copytree(run, tmp_path / "other")
    (tmp_path / "victim.txt").write_text("not yours")
    (tmp_path / "link.pt").symlink_to(tmp_path / "victim.txt")
    arguments = [a.format(run=run, other=tmp_path / "other", tmp=tmp_path) for a in arguments]
    refused(tmp_path, ["export", str(run), *arguments], message)


COMPARE_PATH_CASES = [
    (["--plot", "{tmp}/curves.png"], "--plot {tmp}/curves.png exists"),
    (["--json", "{tmp}/curves.png"], "--json {tmp}/curves.png exists"),
    (["--plot", "{run}/curves.png"], "is inside another run directory"),
    (["--plot", ""], "--plot must name a file"),
]


@pytest.mark.parametrize("arguments,message", COMPARE_PATH_CASES, ids=[m[:24] for _, m in COMPARE_PATH_CASES])
def test_compare_never_replaces_or_writes_into_runs(run, tmp_path, arguments, message):
    (tmp_path / "curves.png").write_bytes(b"an earlier figure")
    arguments = [a.format(run=run, tmp=tmp_path) for a in arguments]
    refused(tmp_path, ["compare", str(run), *arguments], message.format(tmp=tmp_path))


# --- security: every writer is exclusive and never follows a link ---------------------------------


@pytest.mark.parametrize(
    "command", [["export", "{run}", "--out", "{tmp}/b.safetensors"], ["compare", "{run}", "--plot", "{tmp}/curves.png"]]
)
def test_links_planted_at_predictable_temporary_names_are_neither_followed_nor_removed(run, tmp_path, command):
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    target = tmp_path / ("b.safetensors" if command[0] == "export" else "curves.png")
    planted = [tmp_path / f".{target.name}.tmp-{pid}" for pid in range(os.getpid() - 2, os.getpid() + 3)]
    for link in planted:
        link.symlink_to(victim)
    result = invoke(tmp_path, [a.format(run=run, tmp=tmp_path) for a in command])
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "not yours" and all(link.is_symlink() for link in planted)
    assert target.is_file() and not target.is_symlink()


def test_writes_leave_no_temporary_file_and_replace_links_not_their_targets(tmp_path):
    from suncet.engine.files import write_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    (tmp_path / "out.json").symlink_to(victim)
    write_atomic(tmp_path / "out.json", lambda handle: handle.write(b"{}"))
    assert victim.read_text() == "not yours" and not (tmp_path / "out.json").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "victim.txt"]


# --- silent wrong results -------------------------------------------------------------------------


def _export(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "backbone.safetensors"
    result = invoke(tmp_path, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _rewrite(path: Path, weights=None, metadata=None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        old_metadata = handle.metadata()
        old_weights = {k: handle.get_tensor(k) for k in handle.keys()}
    info = json.loads(old_metadata["suncet.backbone"])
    info.update(metadata or {})
    save_file(
        weights(old_weights) if weights else old_weights, str(path), metadata={"suncet.backbone": json.dumps(info)}
    )


def _nan_first(weights):
    key = next(k for k, v in weights.items() if v.is_floating_point())
    return {**weights, key: torch.full_like(weights[key], float("nan"))}


LOAD_CASES = [
    ({"weights": _nan_first}, "are not finite"),
    ({"metadata": {"in_channels": 10**9}}, "backbone in_channels must be an integer in [1, 1024]"),
    ({"metadata": {"image_size": -8}}, "backbone image_size must be an integer in [1, 16384]"),
    ({"metadata": {"image_size": "8"}}, "backbone image_size must be an integer"),
    ({"metadata": {"mean": [float("nan")]}}, "backbone mean must be 1 finite numbers"),
    ({"metadata": {"std": [0.0]}}, "backbone std must be 1 finite numbers (one per input channel), each > 0"),
    ({"metadata": {"options": {"width": 4096}}}, "does not match the model its settings describe"),
    ({"metadata": {"options": {"width": 2**70}}}, "option width of backbone 'small_resnet' must be int"),
    ({"metadata": {"options": "width=8"}}, "backbone options must be a mapping"),
    (
        {"weights": lambda w: {k: v[:1] if v.dim() else v for k, v in w.items()}},
        "does not match the model its settings describe",
    ),
]


@pytest.mark.parametrize("change,message", LOAD_CASES, ids=[m[:30] + str(i) for i, (_, m) in enumerate(LOAD_CASES)])
def test_load_backbone_checks_a_safetensors_file_as_it_checks_a_run(run, tmp_path, change, message):
    import suncet
    from suncet.errors import SuncetError

    path = _export(run, tmp_path)
    _rewrite(path, **change)
    with pytest.raises(SuncetError) as info:
        suncet.load_backbone(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_export_refuses_invalid_normalisation_statistics(run, tmp_path):
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["normalisation"] = {"mean": [float("nan")], "std": [0.4]}
    torch.save(state, run / "checkpoints" / "last.pt")
    refused(
        tmp_path,
        ["export", str(run), "--out", str(tmp_path / "b.safetensors")],
        "backbone mean must be 1 finite numbers",
    )


@pytest.mark.parametrize(
    "command,edit,message",
    [
        ("eval", ("width: 8", "width: 16"), "is [8, 1, 3, 3] there but [16, 1, 3, 3] here"),
        ("export", ("width: 8", "width: 16"), "is [8, 1, 3, 3] there but [16, 1, 3, 3] here"),
        # 10^9 hidden units would take gigabytes: refused from a meta-device build, nothing allocated
        (
            "eval",
            ("proj_hidden: 64", "proj_hidden: 1000000000"),
            "head.0.weight is [64, 32] there but [1000000000, 32] here",
        ),
    ],
)
def test_a_config_that_no_longer_matches_its_checkpoint_is_named_in_one_line(run, tmp_path, command, edit, message):
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(*edit))
    arguments = [command, str(run)] + (["--out", str(tmp_path / "b.safetensors")] if command == "export" else [])
    refused(tmp_path, arguments, message)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"epochs: 3\ntau: 0.2\nepochs: 5\n", "sets 'epochs' twice (again on line 3); keep one"),
        (b"method_options:\n  local_crops: 2\n  local_crops: 4\n", "sets 'local_crops' twice"),
    ],
)
def test_settings_files_that_set_a_key_twice_are_refused(tmp_path, content, message):
    (tmp_path / "twice.yaml").write_bytes(content)
    refused(tmp_path, ["train", "--config", str(tmp_path / "twice.yaml"), "--out", str(tmp_path / "r")], message)


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_config_naming_a_directory_pipe_or_device_says_so(tmp_path, kind):
    target = {"directory": tmp_path / "settings", "fifo": tmp_path / "pipe", "device": Path("/dev/null")}[kind]
    if kind == "directory":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    message = "is a directory" if kind == "directory" else "is not a regular file"
    refused(tmp_path, ["train", "--config", str(target), "--out", str(tmp_path / "r")], message)


def test_runs_json_is_valid_json_and_nan_is_never_the_best(run, tmp_path):
    metrics = run / "metrics.csv"
    header, row = metrics.read_text().splitlines()[:2]
    cells = dict(zip(header.split(","), row.split(",")))
    second = {**cells, "epoch": "2", "knn_top1": "nan"}
    metrics.write_text("\n".join([header, row, ",".join(second[k] for k in header.split(","))]) + "\n")
    result = invoke(tmp_path, ["runs", str(tmp_path), "--json"])
    assert result.exit_code == 0
    (summary,) = json.loads(result.stdout)  # json.loads refuses a bare NaN
    assert summary["knn_top1_best"] == pytest.approx(float(cells["knn_top1"])) and summary["knn_top1_last"] is None


def test_compare_counts_a_run_named_twice_once(run, tmp_path):
    result = invoke(tmp_path, ["compare", str(run), str(run), f"{run}/../run", "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    (group,) = json.loads((tmp_path / "c.json").read_text())["groups"]
    assert group["runs"] == 1


# --- crashes, tracebacks, unclear exits -----------------------------------------------------------


@pytest.mark.parametrize(
    "arguments,message",
    [
        (
            ["--nproc-per-node", "3", "--batch-size", "1000"],
            "--batch-size 1000 is more than the 1437 unlabeled images of digits per rank (3 ranks); at most 479 works",
        ),
        (
            ["--nproc-per-node", "2", "--classes-per-step", "11"],
            "--classes-per-step 11 is more than the 10 classes with labeled images",
        ),
        (["--nproc-per-node", "2", "--labels", "0.01%"], "selects none of the 1437 training images"),
    ],
)
def test_checks_that_need_the_data_run_before_torchrun_starts(tmp_path, arguments, message):
    refused(tmp_path, ["train", *SMALL, *arguments, "--out", str(tmp_path / "run")], message)


DAMAGED_CASES = [
    ("metrics.csv", b"\x00\xff\xfe binary \x00", "cannot be read as suncet's metrics"),
    ("metrics.csv", b"loss,lr\n1.0,0.1\n", "has no epoch column"),
    ("metrics.csv", b"epoch,loss\n1.5,2.0\n", "ends with epoch '1.5', not a whole number"),
    ("status.json", b'{"state": "running", "time": "now"}', "status.json lacks a valid 'pid'"),
    ("status.json", b"[1, 2]", "status.json holds no mapping"),
    ("config.yaml", b"epochs: [1\n", "is not valid YAML"),
]


@pytest.mark.parametrize("name,content,message", DAMAGED_CASES, ids=[m[:24] for _, _, m in DAMAGED_CASES])
def test_one_damaged_run_is_listed_as_damaged_and_the_others_as_they_are(run, tmp_path, name, content, message):
    shutil.copytree(run, tmp_path / "damaged")
    (tmp_path / "damaged" / name).write_bytes(content)
    for as_json in (False, True):
        result = invoke(tmp_path, ["runs", str(tmp_path)] + (["--json"] if as_json else []))
        assert result.exit_code == 0, result.output
    rows = {Path(r["run"]).name: r for r in json.loads(result.stdout)}
    assert rows["run"]["state"] == "finished"
    assert rows["damaged"]["state"] == "damaged" and message in rows["damaged"]["reason"]


def _image_folder(root: Path, bomb: tuple[int, int]) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for c, name in enumerate(("ant", "bee")):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), (40 * c, 10 * i, 0)).save(root / split / name / f"{i}.png")
    Image.new("1", bomb).save(root / "train" / "ant" / "bomb.png", optimize=True)
    return root


@pytest.mark.parametrize("size", [(12_000, 9_000), (20_000, 20_000)])
def test_an_image_whose_header_declares_too_many_pixels_is_refused_before_decoding(tmp_path, size):
    data = _image_folder(tmp_path / "data", size)
    assert (data / "train" / "ant" / "bomb.png").stat().st_size < 100_000
    arguments = [
        "train",
        "--dataset",
        "imagefolder",
        "--data",
        str(data),
        "--labels",
        "50%",
        "--dataset-opt",
        "size=16",
        "--augment",
        "global_crop_size=16",
        "--augment",
        "local_crop_size=8",
        "--backbone",
        "small_resnet",
        *SMALL,
        "--batch-size",
        "4",
        "--out",
        str(tmp_path / "run"),
    ]
    result = suncet(*arguments, timeout=300)
    assert result.returncode == 2, result.stderr
    declared = f"{size[0]} x {size[1]} pixels" if size[0] * size[1] < 178_956_970 else "more than 178,956,970 pixels"
    assert f"image {data}/train/ant/bomb.png declares {declared}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_max_pixels_lets_a_genuine_large_image_through(tmp_path):
    from suncet.registry import DATASETS

    data = _image_folder(tmp_path / "data", (12_000, 9_000))
    dataset = DATASETS.create(
        "imagefolder", root=str(data), download=False, options={"max_pixels": 200_000_000, "size": 16}
    )
    index = dataset.train.names.index("ant/bomb.png")
    assert dataset.train.load(torch.tensor([index])).sizes.tolist() == [[16, 21]]


def test_sigterm_during_the_final_evaluation_says_so_and_records_it(tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [SUNCET, "train", *SMALL, "--labels", "100%", "--final-eval", "finetune", "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not (run / "checkpoints" / "last.pt").exists():
        time.sleep(0.05)
    # last.pt is the training's last write; the fine-tuning of 1,437 images that follows runs for
    # seconds, far longer than this.
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 75, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("SIGTERM: the final evaluation (training finished; it runs again with --resume")
    )
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and "final evaluation" in status["reason"]
    assert not list(run.glob("eval_*.json"))


def test_sigterm_during_an_export_says_so_and_writes_nothing(run, tmp_path, monkeypatch):
    import suncet.engine.export as export

    real = export._from_run

    def interrupted(run_dir):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(run_dir)

    monkeypatch.setattr(export, "_from_run", interrupted)
    refused(
        tmp_path,
        ["export", str(run), "--out", str(tmp_path / "b.safetensors")],
        "SIGTERM: the export (nothing was written) interrupted",
        code=75,
    )


def test_a_full_disk_during_an_export_is_named_in_one_line(run, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    refused(
        tmp_path,
        ["export", str(run), "--out", str(tmp_path / "b.safetensors")],
        f"no space left on device while writing {tmp_path / 'b.safetensors'}",
    )


def test_stop_at_once_restores_the_handlers_it_replaced():
    from suncet.engine.stopping import EXIT_PREEMPTED, stop_at_once
    from suncet.errors import TrainingStopped

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped) as info, stop_at_once("the test"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert info.value.exit_code == EXIT_PREEMPTED and str(info.value) == "SIGTERM: the test interrupted"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_link_inside_the_tensorboard_folder_is_refused(run, tmp_path):
    (run / "tensorboard").mkdir()
    (tmp_path / "victim").write_text("not yours")
    (run / "tensorboard" / "events.out.tfevents.1.host.2.0").symlink_to(tmp_path / "victim")
    refused(tmp_path, ["train", "--resume", str(run)], "is a symbolic link")
