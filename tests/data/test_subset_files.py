"""Label subset files: SimCLR-style file-name lists and index lists, and every way they can be wrong."""

from __future__ import annotations

import pytest
import torch
from torchvision.io import encode_jpeg, write_file

from suncet.data import ImageDataset, InMemoryImages
from suncet.data.labels import read_index_file, read_subset_file
from suncet.data.recipe import AugmentRecipe, CropSpec
from suncet.errors import ConfigError
from suncet.registry import DATASETS

NAMES = [
    "n01440764/n01440764_10026.JPEG",
    "n01440764/n01440764_10027.JPEG",
    "n01443537/n01443537_2.JPEG",
    "n01443537/n01443537_7.JPEG",
    "n01484850/n01484850_3.JPEG",
]


def named_dataset(names: list[str] | None = NAMES) -> ImageDataset:
    n = 5
    train = InMemoryImages(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 1, 1, 2]), names)
    recipe = AugmentRecipe(CropSpec(4, (0.5, 1.0)), CropSpec(2, (0.2, 0.5)), 0.5, 0.0, (0.5,) * 3, (0.2,) * 3)
    return ImageDataset("named", train, train, num_classes=3, channels=3, image_size=4, recipe=recipe)


def test_simclr_name_list_matches_base_names(tmp_path):
    subset = tmp_path / "1percent.txt"
    subset.write_text("n01443537_7.JPEG\nn01440764_10026.JPEG\n\n")
    indices = read_subset_file(subset, named_dataset())
    assert indices.tolist() == [0, 3]
    assert named_dataset().train.labels[indices].tolist() == [0, 1]  # classes come from the folders


def test_relative_names_and_comments(tmp_path):
    subset = tmp_path / "subset.txt"
    subset.write_text("# chosen by hand\nn01484850/n01484850_3.JPEG  # the fish\nn01440764_10027.JPEG\n")
    assert read_subset_file(subset, named_dataset()).tolist() == [1, 4]


def test_index_list_reads_as_indices(tmp_path):
    subset = tmp_path / "indices.txt"
    subset.write_text("4\n0\n2\n")
    assert read_subset_file(subset, named_dataset()).tolist() == [0, 2, 4]
    assert read_subset_file(subset, named_dataset(names=None)).tolist() == [0, 2, 4]
    assert read_index_file(subset, 5).tolist() == [0, 2, 4]  # unchanged


def test_unknown_name_names_it_and_the_file(tmp_path):
    subset = tmp_path / "10percent.txt"
    subset.write_text("n01440764_10026.JPEG\nn09999999_1.JPEG\n")
    with pytest.raises(
        ConfigError, match=rf"{subset}:2: no training image of dataset named is named 'n09999999_1.JPEG'"
    ):
        read_subset_file(subset, named_dataset())


def test_unknown_index_and_missing_file(tmp_path):
    subset = tmp_path / "indices.txt"
    subset.write_text("1\n5\n")
    with pytest.raises(ConfigError, match=rf"{subset}:2: index 5 is outside the training set \(0..4\)"):
        read_subset_file(subset, named_dataset())
    with pytest.raises(ConfigError, match=f"label subset file {tmp_path / 'absent.txt'} does not exist"):
        read_subset_file(tmp_path / "absent.txt", named_dataset())


def test_malformed_subset_files(tmp_path):
    subset = tmp_path / "subset.txt"
    subset.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="lists no images"):
        read_subset_file(subset, named_dataset())
    subset.write_text("n01440764_10026.JPEG\n3\n")
    with pytest.raises(ConfigError, match=rf"{subset}:2: '3' is an index, but other lines are file names"):
        read_subset_file(subset, named_dataset())
    subset.write_text("n01440764_10026.JPEG\nn01440764/n01440764_10026.JPEG\n")
    with pytest.raises(ConfigError, match="listed twice"):
        read_subset_file(subset, named_dataset())
    subset.write_text("n01440764_10026.JPEG\n")
    with pytest.raises(ConfigError, match="dataset named has no file names: list training indices instead"):
        read_subset_file(subset, named_dataset(names=None))


def test_ambiguous_base_name_asks_for_the_folder(tmp_path):
    subset = tmp_path / "subset.txt"
    subset.write_text("same.jpg\n")
    dataset = named_dataset(["a/same.jpg", "b/same.jpg", "a/x.jpg", "b/y.jpg", "c/z.jpg"])
    with pytest.raises(ConfigError, match="'same.jpg' names 2 training images .*write the class folder too"):
        read_subset_file(subset, dataset)
    subset.write_text("b/same.jpg\n")
    assert read_subset_file(subset, dataset).tolist() == [1]


def test_subset_of_a_real_image_folder(tmp_path):
    image = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    for name in NAMES:
        path = tmp_path / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(str(path), encode_jpeg(image))
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    write_file(str(tmp_path / "val" / "n01440764" / "v.JPEG"), encode_jpeg(image))
    dataset = DATASETS.create("imagefolder", root=str(tmp_path), download=False, options={"size": 8})
    subset = tmp_path / "subset.txt"
    subset.write_text("n01484850_3.JPEG\nn01440764_10027.JPEG\n")
    indices = read_subset_file(subset, dataset)
    assert [dataset.train.names[i] for i in indices] == [NAMES[1], NAMES[4]]
    assert dataset.train.labels[indices].tolist() == [0, 2]
