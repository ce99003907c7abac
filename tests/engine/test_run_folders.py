"""Run folders: recognised by suncet's own marks alone, set aside all or nothing, files kept as
reported, files written with the user's permissions, and paths refused by what they are."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SMALL, SUNCET, refused, snapshot

from suncet.cli.main import main
from suncet.engine import rundir
from suncet.engine.state import newest_loadable
from suncet.errors import ConfigError


def project_folder(root: Path, with_labels: bool = False) -> Path:
    """A user's own project: a config.yaml of theirs, a README, sources (and a labels.txt)."""
    project = root / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.yaml").write_text("method: simclr\ndataset: digits\nepochs: 1\n")
    (project / "README.md").write_text("# my project\n")
    (project / "src" / "model.py").write_text("WIDTH = 8\n")
    if with_labels:
        (project / "labels.txt").write_text("1\n2\n3\n")
    return project


@pytest.mark.parametrize("with_labels", [False, True], ids=["config.yaml", "config.yaml and labels.txt"])
@pytest.mark.parametrize(
    "how", [["--resume", "auto"], ["--overwrite"], ["--overwrite", "--resume", "auto"]], ids=lambda how: " ".join(how)
)
def test_a_project_folder_holding_a_config_yaml_is_not_taken_for_a_run(tmp_path, how, with_labels):
    project = project_folder(tmp_path, with_labels)
    refused(tmp_path, ["train", *SMALL, *how, "--out", str(project)], "is not empty and holds no suncet run")


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["train", "--resume", "{project}"], "is not a run directory"),
        (["eval", "{project}"], "is not a run directory"),
        (["export", "{project}"], "is not a run directory"),
        (["compare", "{project}"], "is not a run directory"),
    ],
)
def test_commands_on_a_project_folder_refuse_it(tmp_path, arguments, message):
    project = project_folder(tmp_path, with_labels=True)
    refused(tmp_path, [a.format(project=project) for a in arguments], message)


def test_runs_does_not_list_a_project_folder(tmp_path, copy_of_finished_run):
    run = copy_of_finished_run("runs/run")
    project_folder(run.parent)
    result = CliRunner().invoke(main, ["runs", str(run.parent), "--json"])
    assert result.exit_code == 0 and '"run"' in result.output and "project" not in result.output


@pytest.mark.parametrize("inside", ["checkpoints/new", "sub", "replaced-20260101-000000"])
def test_a_new_run_inside_another_run_is_refused(tmp_path, copy_of_finished_run, inside):
    run = copy_of_finished_run()
    refused(tmp_path, ["train", *SMALL, "--out", str(run / inside)], f"is inside another run directory, {run}")


def test_a_checkpoint_reported_as_kept_is_never_replaced(tmp_path, copy_of_finished_run):
    checkpoints = copy_of_finished_run() / "checkpoints"
    reports = []
    for round_ in range(3):  # the same broken name on three resumes
        (checkpoints / "last.pt").unlink(missing_ok=True)
        (checkpoints / "last.pt").write_bytes(f"broken {round_}".encode())
        assert newest_loadable(checkpoints, reports.append, set_aside=True) is not None
    kept = {p.name: p.read_bytes() for p in checkpoints.glob("last.pt.unreadable*")}
    assert kept == {
        "last.pt.unreadable": b"broken 0",
        "last.pt.unreadable-2": b"broken 1",
        "last.pt.unreadable-3": b"broken 2",
    }
    assert [r.rsplit("kept as ", 1)[1] for r in reports if "kept as" in r] == sorted(kept)


def test_moving_a_run_aside_is_all_or_nothing(tmp_path, copy_of_finished_run, monkeypatch):
    run = copy_of_finished_run()
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    real_rename = Path.rename

    def rename(self, target):
        if self.name == "metrics.csv":  # the third entry: two are already moved
            raise PermissionError(13, "Permission denied", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(
        ConfigError,
        match=r"could not move metrics.csv of .* aside \(Permission denied\); nothing was "
        r"moved, .* holds its files as before",
    ):
        rundir.move_aside(run)
    assert snapshot(run) == before and not list(run.glob("replaced-*"))


def test_a_stop_request_half_way_through_moving_aside_moves_everything_back(
    tmp_path, copy_of_finished_run, monkeypatch
):
    run = copy_of_finished_run()
    before = snapshot(run)
    real_rename = Path.rename

    def rename(self, target):
        if self.name == "labels.txt":
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        rundir.move_aside(run)
    assert snapshot(run) == before and not list(run.glob("replaced-*"))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_an_export_gets_the_mode_the_umask_gives(tmp_path, finished_run, umask, mode):
    out = tmp_path / "backbone.safetensors"
    result = subprocess.run(
        [SUNCET, "export", str(finished_run), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(umask),
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_overwrite_keeps_the_mode_of_the_file_it_replaces(tmp_path, finished_run):
    out = tmp_path / "backbone.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o664)
    result = subprocess.run(
        [SUNCET, "export", str(finished_run), "--out", str(out), "--overwrite"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o664 and out.read_bytes() != b"old"


def special(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"a-{kind}"
    if kind == "pipe":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_text("text")
    return path


@pytest.mark.parametrize(
    "arguments,kind,message",
    [
        (["train", *SMALL, "--out", "{path}"], "pipe", "--out {path} is a named pipe"),
        (["train", "--resume", "{path}"], "pipe", "--resume {path} is a named pipe, not a run directory"),
        (["export", "{path}"], "pipe", "{path} is a named pipe, not a run directory"),
        (["export", "{path}"], "file", "{path} is a file, not a run directory"),
        (["runs", "{path}"], "pipe", "{path} is a named pipe, not a folder of runs"),
        (
            ["train", *SMALL, "--labels", "{path}", "--out", "{path}-run"],
            "pipe",
            "label subset file {path} is a named pipe",
        ),
        (
            ["train", *SMALL, "--labels", "{path}", "--out", "{path}-run"],
            "directory",
            "label subset file {path} is a directory",
        ),
        (
            ["train", *SMALL, "--out", "{path}/run"],
            "file",
            "--out {path}/run cannot be made: {path} is a file, not a folder",
        ),
        (
            ["compare", "{run}", "--json", "{path}/c.json"],
            "file",
            "--json {path}/c.json cannot be written: {path} is a file",
        ),
        (
            ["export", "{run}", "--out", "{path}/b.safetensors"],
            "file",
            "cannot be written: {path} is a file, not a folder",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 12 else None,
)
def test_a_path_is_refused_by_what_it_is(tmp_path, finished_run, arguments, kind, message):
    path = special(tmp_path, kind)
    fill = {"path": path, "run": finished_run}
    refused(tmp_path, [a.format(**fill) for a in arguments], message.format(**fill))


def test_a_text_file_as_a_checkpoint_is_not_said_to_ask_for_code(tmp_path, copy_of_finished_run):
    run = copy_of_finished_run()
    last = run / "checkpoints" / "last.pt"
    last.unlink()
    last.write_text("hello, I am a text file\n")
    refused(tmp_path, ["eval", str(run)], "is not a file torch.save writes")


def test_a_directory_as_a_checkpoint_is_named_as_one(tmp_path, copy_of_finished_run):
    run = copy_of_finished_run()
    (run / "checkpoints" / "last.pt").unlink()
    (run / "checkpoints" / "last.pt").mkdir()
    refused(tmp_path, ["export", str(run)], "last.pt is a directory, not a checkpoint file")


def test_an_unwritable_target_is_named_not_its_temporary_file(tmp_path, finished_run):
    refused(
        tmp_path,
        ["export", str(finished_run), "--out", "/proc/backbone.safetensors"],
        "cannot write /proc/backbone.safetensors:",
    )
