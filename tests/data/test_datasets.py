"""Dataset plugins read small files written here in the real release formats, and fail clearly."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from conftest import cifar_images, dump, write_cifar10
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, encode_png, write_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from suncet.data import ImageDataset
from suncet.data.augment import BatchAugment, eval_transform
from suncet.data.image_batch import ImageBatch
from suncet.data.pipeline import DevicePipeline, StepPlan
from suncet.data.recipe import ViewColumn, override_recipe
from suncet.data.worker_pipeline import WorkerPipeline
from suncet.engine.protocols import finetune_recipe
from suncet.errors import ConfigError
from suncet.registry import DATASETS


def create(name: str, **kwargs) -> ImageDataset:
    return DATASETS.create(name, root=kwargs.pop("root", None), download=kwargs.pop("download", False), options=kwargs)


# ---------------------------------------------------------------------------------------------
# CIFAR: python pickles of {'data': uint8 [N, 3072] (R, G, B planes), 'labels': [...]}.


def write_cifar100(root: Path) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train, test = cifar_images(6, 1), cifar_images(2, 2)
    dump(
        folder / "train",
        {"fine_labels": [0, 5, 10, 50, 98, 99], "coarse_labels": [0] * 6, "data": train.reshape(6, -1)},
    )
    dump(folder / "test", {"fine_labels": [7, 8], "coarse_labels": [0, 0], "data": test.reshape(2, -1)})
    dump(folder / "meta", {"fine_label_names": [f"f{c}" for c in range(100)], "coarse_label_names": ["c"] * 20})
    return {"train": train, "test": test}


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_reads_the_python_release(tmp_path, point_at):
    written = write_cifar10(tmp_path)
    root = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    dataset = create("cifar10", root=str(root))
    assert (dataset.num_classes, dataset.channels, dataset.image_size) == (10, 3, 32)
    assert len(dataset.train) == 15 and len(dataset.test) == 4
    assert dataset.class_names[3] == "class3"
    assert torch.equal(dataset.train.images, torch.from_numpy(written["train"]))
    assert torch.equal(dataset.train.labels, torch.from_numpy(written["labels"]))
    assert torch.equal(dataset.test.load(torch.tensor([2, 0])), torch.from_numpy(written["test"][[2, 0]]))
    recipe = dataset.recipe
    assert recipe.global_crop.size == 32 and recipe.global_crop.scale == (0.08, 1.0)
    assert recipe.color_strength == 0.5 and recipe.blur_p == 0 and recipe.local_crop.size == 16


def test_cifar_pixel_layout_is_planes_of_rows(tmp_path):
    write_cifar10(tmp_path, per_batch=1)
    folder = tmp_path / "cifar-10-batches-py"
    data = np.zeros((1, 3072), np.uint8)
    data[0, 0] = 200  # red, row 0, column 0
    data[0, 1024 + 32 * 2 + 5] = 100  # green, row 2, column 5
    dump(folder / "data_batch_1", {"labels": [4], "data": data})
    image = create("cifar10", root=str(tmp_path)).train.images[0]
    assert image[0, 0, 0] == 200 and image[1, 2, 5] == 100 and image.sum() == 300


def test_cifar100_reads_fine_labels(tmp_path):
    written = write_cifar100(tmp_path)
    dataset = create("cifar100", root=str(tmp_path))
    assert dataset.num_classes == 100 and dataset.class_names[99] == "f99"
    assert dataset.train.labels.tolist() == [0, 5, 10, 50, 98, 99]
    assert torch.equal(dataset.test.images, torch.from_numpy(written["test"]))
    assert dataset.recipe.mean != create("cifar10", root=str(write_cifar10_root(tmp_path))).recipe.mean


def write_cifar10_root(tmp_path: Path) -> Path:
    write_cifar10(tmp_path / "ten")
    return tmp_path / "ten"


def test_cifar_missing_directory_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=f"no cifar10 data in {tmp_path / 'nowhere'}.*cifar-10-batches-py"):
        create("cifar10", root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="needs --data"):
        create("cifar100")


def test_cifar_bad_and_truncated_pickles_name_the_file(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(b"this is not a pickle")
    with pytest.raises(ConfigError, match=f"{batch} is not a CIFAR python pickle"):
        create("cifar10", root=str(tmp_path))
    dump(batch, {"labels": [1, 2], "data": np.zeros((2, 3072), np.uint8)})
    batch.write_bytes(batch.read_bytes()[:-200])
    with pytest.raises(ConfigError, match=f"{batch} is not a CIFAR python pickle"):
        create("cifar10", root=str(tmp_path))


class _Python2Pickler(pickle._Pickler):
    """Writes strings and bytes as Python 2's ``str`` (BINSTRING opcodes), as cPickle wrote the
    CIFAR release under Python 2: unpickled with encoding="latin1" they come back as str."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def dump_python2(path: Path, content: dict) -> None:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(content)
    # numpy before 2.0 (all the release knew) named its array reconstructor numpy.core.multiarray.
    path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def test_cifar_python2_release_format_loads(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = [cifar_images(2, i) for i in range(1, 6)]
    for i, x in enumerate(train, start=1):
        dump_python2(
            folder / f"data_batch_{i}",
            {
                "batch_label": f"training batch {i} of 5",
                "labels": [i, 9 - i],
                "data": x.reshape(2, -1),
                "filenames": ["a.png", "b.png"],
            },
        )
    test = cifar_images(1, 7)
    dump_python2(folder / "test_batch", {"labels": [3], "data": test.reshape(1, -1)})
    dump_python2(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(10)], "num_vis": 3072})
    assert b"cnumpy.core.multiarray\n_reconstruct" in (folder / "test_batch").read_bytes()
    assert b"_codecs" not in (folder / "test_batch").read_bytes()  # no Python 3 bytes objects in it
    dataset = create("cifar10", root=str(tmp_path))
    assert torch.equal(dataset.train.images, torch.from_numpy(np.concatenate(train)))
    assert dataset.train.labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    assert torch.equal(dataset.test.images, torch.from_numpy(test)) and dataset.class_names[9] == "class9"


def test_cifar_bytes_keys_load(tmp_path):
    """Files re-saved by Python 3 after ``pickle.load(f, encoding="bytes")``: bytes keys and names."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = cifar_images(3, 1), cifar_images(2, 2)
    dump(folder / "train", {b"fine_labels": [0, 42, 99], b"coarse_labels": [0, 1, 2], b"data": train.reshape(3, -1)})
    dump(folder / "test", {b"fine_labels": [7, 8], b"data": test.reshape(2, -1)})
    dump(folder / "meta", {b"fine_label_names": [f"f{c}".encode() for c in range(100)]})
    assert b"_codecs\nencode" in (folder / "train").read_bytes()  # how protocol 2 writes bytes
    dataset = create("cifar100", root=str(tmp_path))
    assert torch.equal(dataset.train.images, torch.from_numpy(train)) and dataset.train.labels.tolist() == [0, 42, 99]
    assert torch.equal(dataset.test.images, torch.from_numpy(test)) and dataset.class_names[42] == "f42"


class _WritesFile:
    """A pickle payload: unpickling calls ``function(*arguments)``."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


@pytest.mark.parametrize("payload", ["os.system", "builtins.open"])
def test_cifar_pickle_with_code_is_refused_and_not_run(tmp_path, payload):
    marker = tmp_path / "created-by-the-pickle"
    function, arguments = {"os.system": (os.system, (f"touch {marker}",)), "builtins.open": (open, (str(marker), "w"))}[
        payload
    ]
    content = {"labels": [0], "data": _WritesFile(function, *arguments)}
    pickle.loads(pickle.dumps(content, protocol=2))  # the payload is real: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    dump(batch, content)
    # How pickle names the callables: os.system lives in posix (nt on Windows), open in io.
    named = {"os.system": r"(posix|nt)\.system", "builtins.open": r"(io|builtins)\.open"}[payload]
    with pytest.raises(ConfigError) as error:
        create("cifar10", root=str(tmp_path))
    assert not marker.exists()
    message = str(error.value)
    assert "\n" not in message
    assert re.fullmatch(
        f"{re.escape(str(batch))} is not a CIFAR python pickle: it asks for {named}, .*refused.*", message
    )


def test_cifar_garbage_and_truncated_files_give_one_line(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    whole = batch.read_bytes()
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    for content in [garbage, b"\x80\x02" + garbage, whole[: len(whole) // 2], whole[:40], whole[:-1], b""]:
        batch.write_bytes(content)
        with pytest.raises(ConfigError) as error:
            create("cifar10", root=str(tmp_path))
        assert str(error.value).startswith(f"{batch} is not a CIFAR python pickle") and "\n" not in str(error.value)


def test_cifar_wrong_shapes_and_missing_files_are_errors(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    dump(folder / "data_batch_2", {"labels": [1], "data": np.zeros((1, 1024), np.uint8)})
    with pytest.raises(
        ConfigError, match=r"data_batch_2: 'data' is uint8 of shape \(1, 1024\), expected uint8 \[N, 3072\]"
    ):
        create("cifar10", root=str(tmp_path))
    dump(folder / "data_batch_2", {"labels": [1, 2], "data": np.zeros((1, 3072), np.uint8)})
    with pytest.raises(ConfigError, match="data_batch_2: 1 images but 2 labels"):
        create("cifar10", root=str(tmp_path))
    (folder / "data_batch_2").unlink()
    with pytest.raises(ConfigError, match="data_batch_2 is missing"):
        create("cifar10", root=str(tmp_path))


def test_download_without_network_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(ConfigError, match=f"could not download cifar10 into {tmp_path}.*no network"):
        create("cifar10", root=str(tmp_path), download=True)


# ---------------------------------------------------------------------------------------------
# STL-10: raw uint8, each image 3 x 96 x 96 stored column-major; labels 1..10 as uint8.


def write_stl10(root: Path, train: int = 4, test: int = 3, unlabeled: int = 5) -> dict[str, np.ndarray]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, count in (("train", train), ("test", test), ("unlabeled", unlabeled)):
        images = rng.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        written[split] = images
        if split != "unlabeled":
            labels = (np.arange(count) % 10 + 1).astype(np.uint8)
            labels.tofile(folder / f"{split}_y.bin")
            written[f"{split}_y"] = labels
    (folder / "class_names.txt").write_text("\n".join(f"name{c}" for c in range(10)) + "\n")
    return written


def test_stl10_reads_the_binary_release_with_unlabeled_split(tmp_path):
    written = write_stl10(tmp_path)
    dataset = create("stl10", root=str(tmp_path))
    assert dataset.image_size == 96 and dataset.class_names[9] == "name9"
    assert torch.equal(dataset.train.images, torch.from_numpy(written["train"]))
    assert dataset.train.labels.tolist() == (written["train_y"].astype(np.int64) - 1).tolist()
    assert torch.equal(dataset.test.images, torch.from_numpy(written["test"]))
    extra = dataset.extra_unlabeled
    assert len(extra) == 5 and (extra.labels == -1).all()
    wanted = torch.tensor([4, 0, 4, 2])
    assert torch.equal(extra.load(wanted), torch.from_numpy(written["unlabeled"][wanted.numpy()]))
    # Pickled for a worker process: the copy maps the file itself and reads the same images.
    copy = pickle.loads(pickle.dumps(extra))
    assert copy._images is None and torch.equal(copy.load(wanted), extra.load(wanted))


def test_stl10_from_its_folder_and_recipe(tmp_path):
    write_stl10(tmp_path)
    dataset = create("stl10", root=str(tmp_path / "stl10_binary"))
    assert dataset.recipe.global_crop.size == 96 and dataset.recipe.blur_p == 0.5


def test_stl10_truncated_binary_and_label_mismatch(tmp_path):
    write_stl10(tmp_path)
    folder = tmp_path / "stl10_binary"
    unlabeled = folder / "unlabeled_X.bin"
    unlabeled.write_bytes(unlabeled.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=f"{unlabeled} has {5 * 27648 - 10} bytes, not a multiple of 27648"):
        create("stl10", root=str(tmp_path))
    write_stl10(tmp_path / "again")
    labels = tmp_path / "again" / "stl10_binary" / "train_y.bin"
    labels.write_bytes(b"\x01\x02")
    with pytest.raises(ConfigError, match=f"{labels} holds 2 labels for 4 images"):
        create("stl10", root=str(tmp_path / "again"))


def test_stl10_missing_data(tmp_path):
    with pytest.raises(ConfigError, match="no STL-10 data in .*train_X.bin"):
        create("stl10", root=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Image folders: PNG and JPEG files of different sizes, decoded and fitted on load.


def write_image(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_png(image) if path.suffix.lower() == ".png" else encode_jpeg(image, quality=95)
    write_file(str(path), data)


def solid(colour: tuple[int, int, int], height: int, width: int) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, height, width).contiguous()


def write_folder(root: Path) -> None:
    write_image(root / "train" / "cat" / "n01_1.png", solid((250, 10, 10), 40, 60))
    write_image(root / "train" / "cat" / "n01_2.JPEG", solid((10, 250, 10), 70, 30))
    write_image(root / "train" / "dog" / "n02_1.jpg", solid((10, 10, 250), 50, 50))
    write_image(root / "train" / "dog" / "n02_2.png", solid((128, 128, 128), 20, 90)[:1])  # grayscale PNG
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    write_image(root / "val" / "dog" / "n02_9.jpg", solid((10, 10, 250), 33, 41))


def test_imagefolder_decodes_whole_images_and_names(tmp_path):
    write_folder(tmp_path)
    dataset = create("imagefolder", root=str(tmp_path))
    assert dataset.class_names == ["cat", "dog"] and dataset.num_classes == 2 and dataset.image_size == 224
    assert dataset.train.names == ["cat/n01_1.png", "cat/n01_2.JPEG", "dog/n02_1.jpg", "dog/n02_2.png"]
    assert dataset.train.labels.tolist() == [0, 0, 1, 1]
    assert dataset.test.labels.tolist() == [1] and len(dataset.test) == 1
    order = [3, 0, 2, 1]
    images = dataset.train.load(torch.tensor(order))
    assert isinstance(images, ImageBatch) and images.pixels.dtype == torch.uint8
    assert images.sizes.tolist() == [[20, 90], [40, 60], [50, 50], [70, 30]]
    assert images.pixels.shape == (4, 3, 70, 90)
    for index, image in zip(order, images):  # each image whole, as torchvision decodes the file
        decoded = decode_image(str(tmp_path / "train" / dataset.train.names[index]), mode=ImageReadMode.RGB)
        assert torch.equal(image, decoded)
    outside = torch.ones_like(images.pixels, dtype=torch.bool)
    for mask, (height, width) in zip(outside, images.sizes.tolist()):
        mask[:, :height, :width] = False
    assert not images.pixels[outside].any()  # padding is zeros
    assert dataset.recipe.global_crop.size == 224 and dataset.recipe.local_crop.size == 96


def test_imagefolder_size_caps_the_short_side_keeping_the_whole_image(tmp_path):
    write_folder(tmp_path)
    dataset = create("imagefolder", root=str(tmp_path), size=24)
    images = dataset.train.load(torch.tensor([0, 1, 3]))
    # torchvision's Resize(24): short side 24, long side int(24 * long / short); 20 px stays.
    assert images.sizes.tolist() == [[24, 36], [56, 24], [20, 90]]
    for index, image in zip([0, 1, 3], images):
        decoded = decode_image(str(tmp_path / "train" / dataset.train.names[index]), mode=ImageReadMode.RGB)
        expected = decoded if min(decoded.shape[-2:]) <= 24 else TF.resize(decoded, [24], antialias=True)
        assert torch.equal(image, expected)
    assert create("imagefolder", root=str(tmp_path), size=None).train.load(torch.tensor([1])).sizes.tolist() == [
        [70, 30]
    ]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs --data"):
        create("imagefolder")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'train'} is not a directory"):
        create("imagefolder", root=str(tmp_path))
    write_folder(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'train'}: .*empty"):
        create("imagefolder", root=str(tmp_path))
    (tmp_path / "train" / "empty").rmdir()
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(ConfigError, match="class 'bird' has no folder in"):
        create("imagefolder", root=str(tmp_path))
    (tmp_path / "val" / "bird").rmdir()
    for size in (0, 2.5, True):
        with pytest.raises(ConfigError, match="option size (of dataset 'imagefolder' )?must be"):
            create("imagefolder", root=str(tmp_path), size=size)


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "readme.txt").write_text("no images here")
    (tmp_path / "val").mkdir()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'val'} holds no class folders"):
        create("imagefolder", root=str(tmp_path))
    (tmp_path / "val" / "cat").mkdir()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'train'}: Found no valid file for the classes cat"):
        create("imagefolder", root=str(tmp_path))


def write_noise_folder(root: Path) -> dict[str, torch.Tensor]:
    """Non-square noise images, one JPEG and one PNG per orientation; returns what torchvision decodes."""
    shapes = {
        "train/a/wide.jpg": (48, 80),
        "train/a/tall.png": (90, 36),
        "train/b/wide.png": (30, 70),
        "train/b/tall.jpg": (64, 40),
    }
    decoded = {}
    for i, (name, (height, width)) in enumerate(shapes.items()):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        write_image(root / name, image)
        decoded[name.removeprefix("train/")] = decode_image(str(root / name), mode=ImageReadMode.RGB)
    write_image(root / "val" / "a" / "v.jpg", solid((1, 2, 3), 20, 30))
    return decoded


def test_imagefolder_crop_boxes_reach_every_edge_as_torchvision(tmp_path):
    decoded = write_noise_folder(tmp_path)
    dataset = create("imagefolder", root=str(tmp_path))
    batch = dataset.train.load(torch.arange(len(dataset.train)))
    crop = dataset.recipe.global_crop
    draws = 3000
    augment = BatchAugment(dataset.recipe, crop, triton_kernels=False)
    params = augment.sample(
        draws * len(batch),
        batch.sizes[:, 0].repeat(draws),
        batch.sizes[:, 1].repeat(draws),
        3,
        torch.Generator().manual_seed(0),
    )
    ours = params[:, ViewColumn.TOP : ViewColumn.WIDTH + 1].long().view(draws, len(batch), 4)
    torch.manual_seed(0)
    for i, name in enumerate(dataset.train.names):
        image = decoded[name]
        height, width = image.shape[-2:]
        assert batch.sizes[i].tolist() == [height, width]
        theirs = torch.tensor(
            [v2.RandomResizedCrop.get_params(image, list(crop.scale), list(dataset.recipe.ratio)) for _ in range(draws)]
        )
        for boxes in (ours[:, i], theirs):
            top, left, h, w = boxes.unbind(1)
            assert top.min() == 0 and left.min() == 0, name  # the top and left edges
            assert (top + h).max() == height and (left + w).max() == width, name  # the bottom and right edges
            assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        # The same distribution: deciles and quartiles of top, left, height and width agree to
        # 3 px (the noise of 3,000 draws is about 1 px here).
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        gap = (torch.quantile(ours[:, i].float(), q, dim=0) - torch.quantile(theirs.float(), q, dim=0)).abs()
        assert gap.max() <= 3, (name, gap)


@pytest.mark.parametrize("size", [32, 80])  # a CPU resamples crops up to 64 px as one batch, larger ones one by one
def test_imagefolder_views_are_crops_of_the_whole_decoded_image(tmp_path, size):
    decoded = write_noise_folder(tmp_path)
    dataset = create("imagefolder", root=str(tmp_path))
    recipe = finetune_recipe(override_recipe(dataset.recipe, {"global_crop_size": size}))
    augment = BatchAugment(recipe, recipe.global_crop, triton_kernels=False)
    batch = dataset.train.load(torch.tensor([0, 1, 2, 3, 1, 0]))
    params = augment.sample(len(batch), *batch.sizes.unbind(1), 3, torch.Generator().manual_seed(5))
    views = augment(batch, torch.Generator().manual_seed(5))
    for index, row, view in zip([0, 1, 2, 3, 1, 0], params, views):
        top, left, h, w = row[ViewColumn.TOP : ViewColumn.WIDTH + 1].long().tolist()
        image = decoded[dataset.train.names[index]].float() / 255
        expected = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        if row[ViewColumn.FLIP] > 0.5:
            expected = TF.horizontal_flip(expected)
        expected = TF.normalize(expected, list(recipe.mean), list(recipe.std))
        assert (view - expected).abs().max() < 1e-4


def test_imagefolder_evaluation_is_resize_256_center_crop_224(tmp_path):
    decoded = write_noise_folder(tmp_path)
    dataset = create("imagefolder", root=str(tmp_path))
    views = eval_transform(dataset.train.load(torch.arange(4)), dataset.recipe)
    torchvision_eval = v2.Compose(
        [
            v2.Resize(256, antialias=True),
            v2.CenterCrop(224),
            v2.Normalize(list(dataset.recipe.mean), list(dataset.recipe.std)),
        ]
    )
    expected = torch.stack([torchvision_eval(decoded[name].float() / 255) for name in dataset.train.names])
    assert views.shape == (4, 3, 224, 224) and (views - expected).abs().max() < 1e-4


@pytest.mark.parametrize("pipeline", ["device", "workers"])
def test_imagefolder_feeds_both_pipelines(tmp_path, pipeline):
    write_noise_folder(tmp_path)
    dataset = create("imagefolder", root=str(tmp_path))
    recipe = override_recipe(dataset.recipe, {"global_crop_size": 24, "local_crop_size": 8})
    if pipeline == "device":
        feed = DevicePipeline(dataset.train, dataset.train, recipe, 2, 1, torch.device("cpu"), seed=0)
    else:
        feed = WorkerPipeline(dataset.train, dataset.train, recipe, 2, 1, torch.device("cpu"), seed=0, num_workers=0)
    plan = StepPlan(unlabeled=torch.tensor([0, 1, 2, 3]), labeled=torch.tensor([1, 2]), labels=torch.tensor([0, 1]))
    (batch,) = feed.batches([plan], epoch=0, first_step=0)
    feed.close()
    assert [v.shape for v in batch.global_views] == [(4, 3, 24, 24)] * 2 and batch.local_views[0].shape == (4, 3, 8, 8)
    assert batch.labeled.shape == (2, 3, 24, 24) and torch.isfinite(batch.labeled).all()


def test_unreadable_image_names_the_file(tmp_path):
    write_folder(tmp_path)
    broken = tmp_path / "train" / "cat" / "n01_1.png"
    broken.write_bytes(b"\x89PNG broken")
    dataset = create("imagefolder", root=str(tmp_path), size=16)
    with pytest.raises(ConfigError, match=f"cannot decode image {broken}"):
        dataset.train.load(torch.tensor([1, 0]))
    broken.unlink()
    with pytest.raises(ConfigError, match=f"cannot read image {broken}"):
        dataset.train.load(torch.tensor([0]))
