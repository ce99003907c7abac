"""Settings bounded by the data: defaults shrink to a small image folder and say so; values the
user gave are refused in one line with the largest that works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torchvision.io import encode_png, write_file

CLASSES = ("ant", "bee", "cow")
PER_CLASS = 8  # 24 training images; 25% labels: 2 of each class


def write_image_folder(root: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", PER_CLASS), ("val", 2)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=generator)
                image[c] = 255  # each class its own dominant channel
                write_file(str(folder / f"{i}.png"), encode_png(image))
    return root


@pytest.fixture
def folder_args(tmp_path):
    data = write_image_folder(tmp_path / "data")
    return (
        "train",
        "--dataset",
        "imagefolder",
        "--data",
        str(data),
        "--labels",
        "25%",
        "--dataset-opt",
        "size=16",
        "--augment",
        "global_crop_size=16",
        "--augment",
        "local_crop_size=8",
        "--backbone",
        "small_resnet",
        "--backbone-opt",
        "width=8",
        "--proj-hidden",
        "32",
        "--epochs",
        "1",
        "--warmup-epochs",
        "1",
        "--monitor-every",
        "0",
        "--final-eval",
        "none",
    )


def test_defaults_fit_a_three_class_folder_and_say_so_once(cli, folder_args, tmp_path):
    run = tmp_path / "run"
    result = cli(*folder_args, "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--classes-per-step 3 (not 10): the 3 classes with labeled images in imagefolder") == 1
    assert result.stdout.count("--batch-size 24 (not 256): the 24 unlabeled images of imagefolder") == 1
    assert "has 2 labeled image(s) per rank, fewer than --images-per-class 4" in result.stdout
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["classes_per_step"], saved["batch_size"], saved["images_per_class"]) == (3, 24, 4)
    # The same command again continues the run: its fitted settings match the checkpoint's.
    again = cli(*folder_args, "--out", str(run), "--resume", "auto")
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(
    "given,message",
    [
        (
            ("--classes-per-step", "10"),
            "--classes-per-step 10 is more than the 3 classes with labeled images in imagefolder; at most 3 works",
        ),
        (
            ("--batch-size", "100"),
            "--batch-size 100 is more than the 24 unlabeled images of imagefolder; at most 24 works",
        ),
    ],
)
def test_values_the_user_gave_are_refused_with_the_largest_that_works(cli, folder_args, tmp_path, given, message):
    result = cli(*folder_args, *given, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


def test_settings_from_a_config_file_count_as_the_users(cli, folder_args, tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("classes_per_step: 5\n")
    result = cli(*folder_args, "--config", str(settings), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "--classes-per-step 5 is more than the 3 classes" in result.stderr
    assert "at most 3 works" in result.stderr and "Traceback" not in result.stderr


def test_learning_rate_follows_the_fitted_batch(cli, folder_args, tmp_path):
    """The digits preset states lr 2.0 per 256 images for a batch of 128; fitted to 24 images, the
    run trains at 2.0 x 24 / 256, says so, and records the rate and batch it used."""
    run = tmp_path / "run"
    result = cli(*folder_args, "--preset", "digits", "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert "--batch-size 24 (not 128)" in result.stdout
    assert "--lr 0.1875 (not 1): the rates follow the global batch, now 24 (unlabeled)" in result.stdout
    assert "lr 0.1875 (for a global batch of 24)" in " ".join(result.stdout.split())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["batch_size"], saved["lr"], saved["lr_batch"]) == (24, 0.1875, 24)
    again = cli(*folder_args, "--preset", "digits", "--out", str(run), "--resume", "auto")
    assert again.returncode == 0, again.stderr  # the same fit and scale on resume: the checkpoint matches


def test_learning_rate_is_computed_once_from_what_the_user_gave(cli, folder_args, tmp_path):
    """Fitted to 24 images: an --lr given without --lr-batch is the run's own and used as given;
    with --lr-batch 256 it is stated for 256 images and scales to the 24 the run has."""
    own = cli(*folder_args, "--preset", "digits", "--lr", "0.5", "--out", str(tmp_path / "own"))
    assert own.returncode == 0, own.stderr
    assert "--batch-size 24 (not 128)" in own.stdout and "--lr " not in own.stdout
    saved = yaml.safe_load((tmp_path / "own" / "config.yaml").read_text())
    assert (saved["batch_size"], saved["lr"], saved["lr_batch"], saved["preset"]) == (24, 0.5, 24, "digits")
    stated = cli(
        *folder_args, "--preset", "digits", "--lr", "0.5", "--lr-batch", "256", "--out", str(tmp_path / "stated")
    )
    assert stated.returncode == 0, stated.stderr
    assert "--lr 0.04688 (not 0.25): the rates follow the global batch, now 24 (unlabeled)" in stated.stdout
    saved = yaml.safe_load((tmp_path / "stated" / "config.yaml").read_text())
    assert (saved["batch_size"], saved["lr"], saved["lr_batch"]) == (24, 0.5 * 24 / 256, 24)
