"""ssl_core.sources: every source kind on real files written here, auto-detection, the registry, errors.

The CIFAR/STL writers produce tiny files in the published formats; torchvision checks files against the md5s
of the published ones, so each writer makes torchvision's md5 table name the files it wrote (monkeypatch).
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar
from PIL import Image
from test_data import random_images
from torchvision.datasets import CIFAR10, CIFAR100, STL10, VisionDataset

import ssl_core.sources as sources
from ssl_core.data import CorruptImageError, SourceRecord
from ssl_core.registry import Registry
from ssl_core.sources import (
    BUILTIN_SOURCES,
    SOURCES,
    ArraySource,
    Cifar10Source,
    Cifar100Source,
    DigitsSource,
    ImageFolderSource,
    NpzSource,
    Stl10Source,
    open_source,
    register_source,
)

# --------------------------------------------------------------------------------------------------
# Writers of real files in the published formats (shared with test_ingest.py)
# --------------------------------------------------------------------------------------------------


def accept_as_published(monkeypatch: pytest.MonkeyPatch, dataset_class: type[VisionDataset], folder: Path) -> None:
    """Let torchvision's ``dataset_class`` accept the files in ``folder``: its md5 table gets their md5s."""

    def table(entries: list[list[str]]) -> list[list[str]]:
        return [[name, hashlib.md5((folder / name).read_bytes()).hexdigest()] for name, _ in entries]

    monkeypatch.setattr(dataset_class, "train_list", table(dataset_class.train_list))
    monkeypatch.setattr(dataset_class, "test_list", table(dataset_class.test_list))
    if hasattr(dataset_class, "meta"):
        meta = dataset_class.meta
        monkeypatch.setattr(dataset_class, "meta", {**meta, "md5": table([[meta["filename"], ""]])[0][1]})


def save_image(array: np.ndarray, path: Path, image_format: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    image.save(path, format=image_format)


def write_image_folder(root: Path) -> dict[str, np.ndarray]:
    """cat/ (2 PNG, 1 grayscale PNG, 1 corrupt PNG) and dog/ (1 JPEG, 1 BMP, 1 truncated JPEG, 1 text file).

    Returns the lossless originals by relative path (PNG/BMP only).
    """
    images = random_images(4, 12, 10, 3, seed=1)
    originals = {
        "cat/a.png": images[0],
        "cat/b.PNG": images[1],
        "cat/gray.png": images[2][:, :, :1],
        "dog/c.bmp": images[3],
    }
    for relative, array in originals.items():
        save_image(array, root / relative, "BMP" if relative.endswith(".bmp") else "PNG")
    save_image(random_images(1, 16, 16, 3, seed=2)[0], root / "dog/d.jpg", "JPEG")
    (root / "cat/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not a png" * 8)
    jpeg = io.BytesIO()
    Image.fromarray(random_images(1, 64, 64, 3, seed=3)[0]).save(jpeg, format="JPEG", quality=95)
    (root / "dog/trunc.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "dog/notes.txt").write_text("not an image")
    return originals


def write_cifar10(
    root: Path, monkeypatch: pytest.MonkeyPatch, per_batch: int = 3, test_count: int = 4
) -> tuple[np.ndarray, list[int]]:
    """A tiny ``cifar-10-batches-py`` folder in the published pickle format (string keys, as Python 2 pickles
    read with latin1); returns all images/labels (train batches 1..5 then test)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_images, all_labels = [], []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for number, name in enumerate(names):
        count = test_count if name == "test_batch" else per_batch
        images = random_images(count, 32, 32, 3, seed=10 + number)
        labels = [(number + i) % 10 for i in range(count)]
        batch = {
            "batch_label": name,
            "labels": labels,
            "data": images.transpose(0, 3, 1, 2).reshape(count, 3072),
            "filenames": [f"{name}_{i}.png" for i in range(count)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        all_images.append(images)
        all_labels.extend(labels)
    meta = {"label_names": "plane car bird cat deer dog frog horse ship truck".split()}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    accept_as_published(monkeypatch, CIFAR10, folder)
    return np.concatenate(all_images), all_labels


def write_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in (("train", 5), ("test", 3)):
        images = random_images(count, 32, 32, 3, seed=len(name))
        batch = {
            "data": images.transpose(0, 3, 1, 2).reshape(count, 3072),
            "fine_labels": [i * 7 % 100 for i in range(count)],
            "coarse_labels": [i % 20 for i in range(count)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    accept_as_published(monkeypatch, CIFAR100, folder)


def write_stl10(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """A tiny ``stl10_binary`` folder: 96x96x3 images stored channel by channel, column-major, labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    parts = {
        "train": (random_images(3, 96, 96, 3, seed=20), np.array([1, 2, 10], dtype=np.uint8)),
        "test": (random_images(2, 96, 96, 3, seed=21), np.array([3, 10], dtype=np.uint8)),
        "unlabeled": (random_images(2, 96, 96, 3, seed=22), None),
    }
    for part, (images, labels) in parts.items():
        (folder / f"{part}_X.bin").write_bytes(images.transpose(0, 3, 2, 1).tobytes())
        if labels is not None:
            (folder / f"{part}_y.bin").write_bytes(labels.tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    accept_as_published(monkeypatch, STL10, folder)
    return parts


def all_images(source: ArraySource) -> np.ndarray:
    return np.stack([source.load(index).image for index in range(len(source.records()))])


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def test_image_folder_with_classes_raises_on_corrupt_files(tmp_path: Path):
    originals = write_image_folder(tmp_path)
    source = open_source(str(tmp_path))
    assert isinstance(source, ImageFolderSource) and source.kind == "folder"
    assert source.class_names == ["cat", "dog"]
    records = {record.id: record.label for record in source.records()}
    assert records == {
        "cat/a.png": 0, "cat/b.PNG": 0, "cat/bad.png": 0, "cat/gray.png": 0,
        "dog/c.bmp": 1, "dog/d.jpg": 1, "dog/trunc.jpg": 1,
    }  # fmt: skip
    samples, corrupt = {}, []
    for index, record in enumerate(source.records()):
        try:
            samples[record.id] = source.load(index)
        except CorruptImageError as error:
            corrupt.append(error.corrupt)
    assert sorted(Path(item.path).name for item in corrupt) == ["bad.png", "trunc.jpg"]
    assert all(item.reason for item in corrupt)
    for relative, array in originals.items():
        assert np.array_equal(samples[relative].image, array), relative
    assert samples["cat/gray.png"].image.shape == (12, 10, 1)
    # PNG/JPEG keep their original bytes, BMP does not (ingest re-encodes it as PNG).
    assert samples["dog/d.jpg"].encoded == (tmp_path / "dog/d.jpg").read_bytes()
    assert samples["cat/a.png"].encoded == (tmp_path / "cat/a.png").read_bytes()
    assert samples["dog/c.bmp"].encoded is None


def test_flat_folder_is_unlabeled(tmp_path: Path):
    for index, image in enumerate(random_images(3, 5, 5, 3)):
        save_image(image, tmp_path / f"img{index}.png", "PNG")
    source = ImageFolderSource(tmp_path)
    assert source.class_names is None
    assert [(r.id, r.label, r.origin_split) for r in source.records()] == [
        ("img0.png", None, None), ("img1.png", None, None), ("img2.png", None, None),
    ]  # fmt: skip


def test_folder_with_loose_images_and_class_dirs_is_rejected(tmp_path: Path):
    save_image(random_images(1, 4, 4, 3)[0], tmp_path / "loose.png", "PNG")
    save_image(random_images(1, 4, 4, 3)[0], tmp_path / "cls" / "x.png", "PNG")
    with pytest.raises(ValueError, match="both loose images and class sub-folders"):
        ImageFolderSource(tmp_path).records()


# --------------------------------------------------------------------------------------------------
# CIFAR and STL-10 through torchvision
# --------------------------------------------------------------------------------------------------


def test_cifar10_from_the_folder_or_its_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    images, labels = write_cifar10(tmp_path, monkeypatch)
    for source_string in (str(tmp_path), str(tmp_path / "cifar-10-batches-py"), f"cifar10:{tmp_path}"):
        source = open_source(source_string)
        assert isinstance(source, Cifar10Source) and source.kind == "cifar10"
        records = source.records()
        assert len(records) == 19 and [r.label for r in records] == labels
        assert [r.origin_split for r in records] == ["train"] * 15 + ["test"] * 4
        assert records[0].id == "cifar10/train/00" and records[15].id == "cifar10/test/0"
        assert np.array_equal(all_images(source), images)
        assert source.class_names[:3] == ["plane", "car", "bird"]


def test_cifar100_uses_fine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write_cifar100(tmp_path, monkeypatch)
    source = open_source(str(tmp_path))
    assert isinstance(source, Cifar100Source) and source.records()[1].id == "cifar100/train/1"
    assert [r.label for r in source.records()] == [0, 7, 14, 21, 28, 0, 7, 14]
    assert len(source.class_names) == 100
    with pytest.raises(FileNotFoundError, match="no cifar10 files data_batch_1"):
        Cifar10Source(tmp_path)


def test_cifar_file_not_matching_the_published_checksum_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write_cifar10(tmp_path, monkeypatch)
    batch_path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch = pickle.loads(batch_path.read_bytes())
    batch["data"][0, 0] ^= 1  # a valid batch, one pixel off the published file
    batch_path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=rf"cifar10 source '{tmp_path}': {batch_path} .*md5") as error:
        open_source(str(tmp_path))
    assert "data_batch_1" not in str(error.value)  # only the damaged file is named
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"no cifar10 files test_batch in .*cifar-10-batches-py"):
        open_source(f"cifar10:{tmp_path}")


def test_cifar10_download_fetches_into_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fetched = []

    def fake_download(url: str, download_root: str, **kwargs) -> None:
        fetched.append((url, Path(download_root)))
        write_cifar10(Path(download_root), monkeypatch)

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    source = open_source(f"cifar10:{tmp_path / 'data'}", download=True)
    assert fetched == [(CIFAR10.url, tmp_path / "data")]  # once: the test split finds the files
    assert len(source.records()) == 19


def test_stl10_binaries_column_major(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    parts = write_stl10(tmp_path, monkeypatch)
    source = open_source(str(tmp_path / "stl10_binary"))
    assert isinstance(source, Stl10Source)
    records = source.records()
    assert [r.id for r in records] == [
        "stl10/train/0", "stl10/train/1", "stl10/train/2", "stl10/test/0", "stl10/test/1",
        "stl10/unlabeled/0", "stl10/unlabeled/1",
    ]  # fmt: skip
    assert [r.label for r in records] == [0, 1, 9, 2, 9, None, None]
    assert [r.origin_split for r in records] == ["train"] * 3 + ["test"] * 2 + ["train"] * 2
    expected = np.concatenate([parts[name][0] for name in ("train", "test", "unlabeled")])
    assert np.array_equal(all_images(source), expected)
    assert source.class_names[9] == "class9"


def test_a_published_dataset_is_detected_before_an_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write_stl10(tmp_path, monkeypatch)
    save_image(random_images(1, 4, 4, 3)[0], tmp_path / "preview.png", "PNG")
    assert ImageFolderSource.detect(tmp_path) is not None  # the folder alone would be an image folder
    assert isinstance(open_source(str(tmp_path)), Stl10Source)


# --------------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------------


def test_npz_with_and_without_test_arrays(tmp_path: Path):
    x = random_images(5, 6, 6, 1)[:, :, :, 0]
    np.savez(tmp_path / "plain.npz", x=x)
    source = open_source(str(tmp_path / "plain.npz"))
    assert isinstance(source, NpzSource)
    assert [(r.id, r.label, r.origin_split) for r in source.records()][0] == ("plain/0", None, None)
    assert np.array_equal(source.load(4).image[:, :, 0], x[4])

    x_rgb, x_test = random_images(4, 6, 6, 3), random_images(2, 6, 6, 3, seed=5)
    np.savez(tmp_path / "split.npz", x=x_rgb, y=np.array([0, 1, 2, 1]), x_test=x_test, y_test=np.array([2, 0]))
    source = NpzSource(tmp_path / "split.npz")
    records = source.records()
    assert [(r.label, r.origin_split) for r in records] == [
        (0, "train"), (1, "train"), (2, "train"), (1, "train"), (2, "test"), (0, "test"),
    ]  # fmt: skip
    assert records[4].id == "split/test/0"
    assert np.array_equal(all_images(source), np.concatenate([x_rgb, x_test]))


def test_npz_bad_input(tmp_path: Path):
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"float\.npz: 'x' must be uint8"):
        NpzSource(tmp_path / "float.npz")
    np.savez(tmp_path / "neg.npz", x=np.zeros((2, 4, 4), dtype=np.uint8), y=np.array([0, -3]))
    with pytest.raises(ValueError, match="non-negative"):
        NpzSource(tmp_path / "neg.npz")
    np.savez(tmp_path / "shapes.npz", x=np.zeros((2, 4, 4), dtype=np.uint8), x_test=np.zeros((1, 5, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="different image shapes"):
        NpzSource(tmp_path / "shapes.npz")


def test_builtin_digits():
    source = open_source("builtin:digits")
    assert isinstance(source, DigitsSource) and source.kind == "digits"
    records = source.records()
    assert len(records) == 1797 and records[0].id == "digits/0000"
    assert sorted({r.label for r in records}) == list(range(10))
    sample = source.load(0)
    assert sample.image.shape == (8, 8, 1) and sample.image.dtype == np.uint8
    assert sample.image.max() > 200  # rescaled from 0..16 to 0..255


# --------------------------------------------------------------------------------------------------
# Resolution and the registry
# --------------------------------------------------------------------------------------------------


def test_open_source_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "labels.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unknown source format for file .*labels\.txt.*cifar10: CIFAR-10"):
        open_source(str(tmp_path / "labels.txt"))
    with pytest.raises(ValueError, match=r"unknown source format for folder"):
        open_source(str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown built-in source 'builtin:nope'; known: builtin:digits"):
        open_source("builtin:nope")
    for source in (str(tmp_path), f"npz:{tmp_path}", "builtin:digits"):
        with pytest.raises(ValueError, match="download is only supported for cifar10:PATH, cifar100:PATH, stl10:PATH"):
            open_source(source, download=True)


def test_registries():
    assert SOURCES.names() == ["cifar10", "cifar100", "folder", "npz", "stl10"]
    assert BUILTIN_SOURCES.names() == ["digits"]
    with pytest.raises(ValueError, match="already registered"):
        register_source("npz")(NpzSource)


def test_a_new_source_kind_is_one_registered_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    registry: Registry = Registry("source kind")
    for kind in SOURCES.names():
        registry.register(kind)(SOURCES.get(kind))
    monkeypatch.setattr(sources, "SOURCES", registry)  # the registration below ends with this test

    @register_source("gray")
    class GrayTextSource(ArraySource):
        description = "a .gray text file of pixel values"

        def __init__(self, path: Path) -> None:
            values = np.array(path.read_text().split(), dtype=np.uint8)
            super().__init__([(str(path), values.reshape(1, 1, -1), [SourceRecord("gray/0", None, None)])])

        @classmethod
        def detect(cls, path: Path) -> GrayTextSource | None:
            return cls(path) if path.suffix == ".gray" else None

    (tmp_path / "a.gray").write_text("1 2 3")
    named = open_source(f"gray:{tmp_path / 'a.gray'}")
    assert named.kind == "gray" and named.load(0).image.tolist() == [[[1], [2], [3]]]
    assert isinstance(open_source(str(tmp_path / "a.gray")), GrayTextSource)
    (tmp_path / "b.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="gray: a .gray text file"):
        open_source(str(tmp_path / "b.bin"))


def test_npz_common_names_keras_labels_and_channels_first(tmp_path: Path):
    train, test = random_images(4, 6, 6, 3), random_images(2, 6, 6, 3, seed=5)
    np.savez(tmp_path / "keras.npz", x_train=train, y_train=np.array([[0], [1], [2], [1]]), x_test=test,
             y_test=np.array([2, 0]))
    source = open_source(str(tmp_path / "keras.npz"))
    assert source.array_names == {"x": "x_train", "y": "y_train", "x_test": "x_test", "y_test": "y_test"}
    assert [(r.label, r.origin_split) for r in source.records()] == [
        (0, "train"), (1, "train"), (2, "train"), (1, "train"), (2, "test"), (0, "test"),
    ]  # fmt: skip
    assert np.array_equal(all_images(source), np.concatenate([train, test]))

    np.savez(tmp_path / "torch.npz", images=train.transpose(0, 3, 1, 2), labels=np.array([3, 0, 1, 2]))
    source = open_source(str(tmp_path / "torch.npz"))
    assert source.array_names == {"x": "images", "y": "labels"}
    assert np.array_equal(all_images(source), train)  # (N, C, H, W) -> (N, H, W, C)
    assert [r.label for r in source.records()] == [3, 0, 1, 2]


def test_npz_names_mapped_by_role(tmp_path: Path):
    train, test = random_images(3, 5, 5, 1)[:, :, :, 0], random_images(2, 5, 5, 1, seed=2)[:, :, :, 0]
    np.savez(tmp_path / "own.npz", pictures=train, classes=np.array([1, 0, 1]), later=test, x=test)
    source = open_source(f"npz:{tmp_path / 'own.npz'}", npz_keys={"x": "pictures", "y": "classes",
                                                                   "x_test": "later"})
    assert source.array_names == {"x": "pictures", "y": "classes", "x_test": "later"}  # 'x' is claimed by nothing
    assert [(r.label, r.origin_split) for r in source.records()] == [
        (1, "train"), (0, "train"), (1, "train"), (None, "test"), (None, "test"),
    ]  # fmt: skip
    assert np.array_equal(all_images(source)[:, :, :, 0], np.concatenate([train, test]))


def test_npz_name_errors(tmp_path: Path):
    images = random_images(2, 4, 4, 1)[:, :, :, 0]
    np.savez(tmp_path / "both.npz", x=images, x_train=images)
    with pytest.raises(ValueError, match=r"both\.npz: arrays 'x' and 'x_train' could both be x; name one with "
                                         r"--npz-key x=NAME"):
        open_source(str(tmp_path / "both.npz"))
    assert open_source(str(tmp_path / "both.npz"), npz_keys={"x": "x_train"}).array_names == {"x": "x_train"}
    np.savez(tmp_path / "none.npz", pixels=images)
    with pytest.raises(ValueError, match=r"none\.npz: no image array \(arrays in the file: pixels\)"):
        open_source(str(tmp_path / "none.npz"))
    with pytest.raises(ValueError, match=r"none\.npz: no array 'imgs' for x \(arrays in the file: pixels\)"):
        open_source(str(tmp_path / "none.npz"), npz_keys={"x": "imgs"})
    with pytest.raises(ValueError, match=r"unknown npz key role 'images'; roles: x, y, x_test, y_test"):
        open_source(str(tmp_path / "none.npz"), npz_keys={"images": "pixels"})
    np.savez(tmp_path / "orphan.npz", x=images, y_test=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"test labels 'y_test' but no test images"):
        open_source(str(tmp_path / "orphan.npz"))
    with pytest.raises(ValueError, match=r"npz keys .* but the source .* is not an \.npz file"):
        open_source(str(tmp_path), npz_keys={"x": "pixels"})
