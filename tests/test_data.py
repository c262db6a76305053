"""ssl_core.data: PNG encoding, batched decoding, and every source type on real files written here."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_core.data import (
    PARQUET_SCHEMA,
    CorruptImage,
    ImageFolderSource,
    Stl10Source,
    cifar_source,
    decode_images,
    digits_source,
    encode_png,
    npz_source,
)

# --------------------------------------------------------------------------------------------------
# Writers of real files in the published formats (shared with test_ingest.py)
# --------------------------------------------------------------------------------------------------


def random_images(count: int, height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, height, width, channels), dtype=np.uint8)


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


def write_cifar10(root: Path, per_batch: int = 3, test_count: int = 4) -> tuple[np.ndarray, list[int]]:
    """A tiny ``cifar-10-batches-py`` folder in the published pickle format; returns all images/labels
    (train batches 1..5 then test)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_images, all_labels = [], []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for number, name in enumerate(names):
        count = test_count if name == "test_batch" else per_batch
        images = random_images(count, 32, 32, 3, seed=10 + number)
        labels = [(number + i) % 10 for i in range(count)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": images.transpose(0, 3, 1, 2).reshape(count, 3072),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(count)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        all_images.append(images)
        all_labels.extend(labels)
    meta = {b"label_names": [name.encode() for name in "plane car bird cat deer dog frog horse ship truck".split()]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(all_images), all_labels


def write_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in (("train", 5), ("test", 3)):
        images = random_images(count, 32, 32, 3, seed=len(name))
        batch = {
            b"data": images.transpose(0, 3, 1, 2).reshape(count, 3072),
            b"fine_labels": [i * 7 % 100 for i in range(count)],
            b"coarse_labels": [i % 20 for i in range(count)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))


def write_stl10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
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
    return parts


# --------------------------------------------------------------------------------------------------
# Encoding / decoding
# --------------------------------------------------------------------------------------------------


def test_schema_matches_contract():
    assert PARQUET_SCHEMA.names == ["id", "image", "label", "split"]
    assert str(PARQUET_SCHEMA.field("label").type) == "int32" and PARQUET_SCHEMA.field("label").nullable


def test_png_round_trip_rgb_and_gray():
    rgb = random_images(1, 7, 5, 3)[0]
    gray = random_images(1, 7, 5, 1)[0]
    images, failed = decode_images([encode_png(rgb), encode_png(gray[:, :, 0]), encode_png(gray)])
    assert failed == [] and images.shape == (3, 3, 7, 5) and images.dtype == torch.uint8
    assert torch.equal(images[0], torch.from_numpy(rgb).permute(2, 0, 1))
    for index in (1, 2):  # grayscale becomes RGB with three equal channels
        assert torch.equal(images[index], torch.from_numpy(gray[:, :, 0]).expand(3, 7, 5))


def test_encode_png_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((4, 4, 2), dtype=np.uint8))


def test_decode_images_reports_corrupt_and_resizes():
    good = encode_png(random_images(1, 8, 8, 3)[0])
    wide = encode_png(random_images(1, 8, 16, 3)[0])
    jpeg = io.BytesIO()
    Image.fromarray(random_images(1, 40, 40, 3)[0]).save(jpeg, format="JPEG")
    truncated = jpeg.getvalue()[:300]
    images, failed = decode_images([good, b"garbage", wide, truncated, good], image_size=4)
    assert failed == [1, 3]
    assert images.shape == (3, 3, 4, 4) and images.dtype == torch.uint8
    # The square image is a plain bilinear resize with PIL.
    expected = Image.open(io.BytesIO(good)).convert("RGB").resize((4, 4), Image.Resampling.BILINEAR)
    assert torch.equal(images[0], torch.from_numpy(np.array(expected)).permute(2, 0, 1))


def test_decode_images_all_failed_and_mixed_sizes():
    images, failed = decode_images([b"x", b""], image_size=6)
    assert images.shape == (0, 3, 6, 6) and failed == [0, 1]
    with pytest.raises(ValueError, match="image_size"):
        decode_images([encode_png(random_images(1, 4, 4, 3)[0]), encode_png(random_images(1, 5, 5, 3)[0])])


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def test_image_folder_with_classes_skips_and_lists_corrupt(tmp_path: Path):
    originals = write_image_folder(tmp_path)
    source = ImageFolderSource(tmp_path)
    assert source.class_names == ["cat", "dog"]
    records = {record.id: record.label for record in source.records()}
    assert records == {
        "cat/a.png": 0, "cat/b.PNG": 0, "cat/bad.png": 0, "cat/gray.png": 0,
        "dog/c.bmp": 1, "dog/d.jpg": 1, "dog/trunc.jpg": 1,
    }  # fmt: skip
    corrupt: list[CorruptImage] = []
    samples = {sample.id: sample for sample in source.samples(corrupt=corrupt)}
    assert sorted(Path(item.path).name for item in corrupt) == ["bad.png", "trunc.jpg"]
    assert all(item.reason for item in corrupt)
    assert sorted(samples) == ["cat/a.png", "cat/b.PNG", "cat/gray.png", "dog/c.bmp", "dog/d.jpg"]
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


def test_cifar10_pickle_batches(tmp_path: Path):
    images, labels = write_cifar10(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        source = cifar_source(root, "cifar10")
        records = source.records()
        assert len(records) == 19 and [r.label for r in records] == labels
        assert [r.origin_split for r in records] == ["train"] * 15 + ["test"] * 4
        assert records[0].id == "cifar10/train/00" and records[15].id == "cifar10/test/0"
        assert np.array_equal(np.stack([s.image for s in source]), images)
        assert source.class_names[:3] == ["plane", "car", "bird"]


def test_cifar100_uses_fine_labels(tmp_path: Path):
    write_cifar100(tmp_path)
    source = cifar_source(tmp_path, "cifar100")
    assert [r.label for r in source.records()] == [0, 7, 14, 21, 28, 0, 7, 14]
    assert len(source.class_names) == 100
    with pytest.raises(FileNotFoundError, match="cifar10"):
        cifar_source(tmp_path, "cifar10")


def test_stl10_binaries_column_major(tmp_path: Path):
    parts = write_stl10(tmp_path)
    source = Stl10Source(tmp_path)
    records = source.records()
    assert [r.id for r in records][:2] == ["stl10/train/0", "stl10/train/1"]
    assert [r.label for r in records] == [0, 1, 9, 2, 9, None, None]
    assert [r.origin_split for r in records] == ["train"] * 3 + ["test"] * 2 + ["train"] * 2
    expected = np.concatenate([parts[name][0] for name in ("train", "test", "unlabeled")])
    assert np.array_equal(np.stack([s.image for s in source]), expected)
    assert source.class_names[9] == "class9"


def test_npz_with_and_without_test_arrays(tmp_path: Path):
    x = random_images(5, 6, 6, 1)[:, :, :, 0]
    np.savez(tmp_path / "plain.npz", x=x)
    source = npz_source(tmp_path / "plain.npz")
    assert [(r.id, r.label, r.origin_split) for r in source.records()][0] == ("plain/0", None, None)
    assert np.array_equal(source.load(4).image[:, :, 0], x[4])

    x_rgb, x_test = random_images(4, 6, 6, 3), random_images(2, 6, 6, 3, seed=5)
    np.savez(tmp_path / "split.npz", x=x_rgb, y=np.array([0, 1, 2, 1]), x_test=x_test, y_test=np.array([2, 0]))
    records = npz_source(tmp_path / "split.npz").records()
    assert [(r.label, r.origin_split) for r in records] == [
        (0, "train"), (1, "train"), (2, "train"), (1, "train"), (2, "test"), (0, "test"),
    ]  # fmt: skip
    assert records[4].id == "split/test/0"


def test_npz_bad_input(tmp_path: Path):
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        npz_source(tmp_path / "float.npz")
    np.savez(tmp_path / "neg.npz", x=np.zeros((2, 4, 4), dtype=np.uint8), y=np.array([0, -3]))
    with pytest.raises(ValueError, match="non-negative"):
        npz_source(tmp_path / "neg.npz")


def test_builtin_digits():
    source = digits_source()
    records = source.records()
    assert len(records) == 1797
    assert sorted({r.label for r in records}) == list(range(10))
    sample = source.load(0)
    assert sample.image.shape == (8, 8, 1) and sample.image.dtype == np.uint8
    assert sample.image.max() > 200  # rescaled from 0..16 to 0..255
