"""The ingest stage end to end on real files: shards, splits, label fractions, manifest, atomicity, errors."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_data import random_images
from test_sources import write_cifar10, write_image_folder, write_stl10

import pipelines.stages.ingest as ingest_module
from pipelines.datasets import MANIFEST_NAME, read_manifest
from pipelines.stages.ingest import ingest
from ssl_core.data import PARQUET_SCHEMA


def read_rows(out: Path) -> dict[str, dict]:
    """All rows of an ingest output by id, checking the schema and one split per shard on the way."""
    rows = {}
    for path in sorted(out.glob("*.parquet")):
        table = pq.read_table(path)
        assert table.schema.equals(PARQUET_SCHEMA, check_metadata=False)
        assert set(table.column("split").to_pylist()) == {path.name.split("-")[0]}
        for row in table.to_pylist():
            rows[row["id"]] = row
    return rows


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "ds"
    ingest("builtin:digits", out, seed=0)
    return out


def test_image_folder_round_trip_with_corrupt_files(tmp_path: Path):
    originals = write_image_folder(tmp_path / "src")
    manifest = ingest(str(tmp_path / "src"), tmp_path / "out", val_fraction=0.0, test_fraction=0.2)
    assert manifest["source_kind"] == "folder" and manifest["class_names"] == ["cat", "dog"]
    assert manifest["corrupt_count"] == 2
    assert sorted(Path(item["path"]).name for item in manifest["corrupt"]) == ["bad.png", "trunc.jpg"]
    assert manifest["channels"] == {"1": 1, "3": 4}
    rows = read_rows(tmp_path / "out")
    assert sorted(rows) == ["cat/a.png", "cat/b.PNG", "cat/gray.png", "dog/c.bmp", "dog/d.jpg"]
    assert {row_id: row["label"] for row_id, row in rows.items()} == {
        "cat/a.png": 0, "cat/b.PNG": 0, "cat/gray.png": 0, "dog/c.bmp": 1, "dog/d.jpg": 1,
    }  # fmt: skip
    for relative, array in originals.items():  # lossless sources come back pixel-exact
        assert np.array_equal(decode(rows[relative]["image"]).reshape(array.shape), array), relative
    assert rows["dog/d.jpg"]["image"] == (tmp_path / "src/dog/d.jpg").read_bytes()  # JPEG stored as is
    # Splits are drawn before pixels are read: one test image per class, unless that one was corrupt.
    splits = Counter(row["split"] for row in rows.values())
    assert 1 <= splits["test"] <= 2 and splits["train"] + splits["test"] == 5
    for split in ("train", "test"):
        labels = Counter(str(row["label"]) for row in rows.values() if row["split"] == split)
        assert manifest["splits"][split]["labels"] == dict(sorted(labels.items()))


def test_flat_folder_is_all_unlabeled_train(tmp_path: Path):
    for index, image in enumerate(random_images(4, 5, 5, 3)):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    manifest = ingest(str(tmp_path), tmp_path.parent / f"{tmp_path.name}-out")
    assert manifest["num_unlabeled"] == 4 and manifest["num_classes"] == 0
    assert manifest["splits"]["train"] == {"rows": 4, "labeled": 0, "unlabeled": 4, "labels": {}}
    rows = read_rows(tmp_path.parent / f"{tmp_path.name}-out")
    assert all(row["label"] is None and row["split"] == "train" for row in rows.values())


def test_cifar10_keeps_its_test_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    images, labels = write_cifar10(tmp_path / "cifar", monkeypatch, per_batch=4, test_count=5)
    manifest = ingest(str(tmp_path / "cifar"), tmp_path / "out", val_fraction=0.25)
    assert manifest["source_kind"] == "cifar10" and manifest["test_split_from"] == "source"
    assert manifest["splits"]["test"]["rows"] == 5
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["val"]["rows"] == 20
    assert manifest["splits"]["val"]["rows"] > 0
    rows = read_rows(tmp_path / "out")
    for index in range(5):
        row = rows[f"cifar10/test/{index}"]
        assert row["split"] == "test" and row["label"] == labels[20 + index]
        assert np.array_equal(decode(row["image"]), images[20 + index])


def test_stl10_unlabeled_goes_to_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    parts = write_stl10(tmp_path / "stl", monkeypatch)
    manifest = ingest(f"stl10:{tmp_path / 'stl'}", tmp_path / "out", val_fraction=0.0)
    assert manifest["image_size"] == [96, 96]
    assert manifest["splits"]["train"] == {"rows": 5, "labeled": 3, "unlabeled": 2, "labels": {"0": 1, "1": 1, "9": 1}}
    assert manifest["splits"]["test"]["rows"] == 2
    rows = read_rows(tmp_path / "out")
    assert np.array_equal(decode(rows["stl10/unlabeled/1"]["image"]), parts["unlabeled"][0][1])


def test_npz_round_trip(tmp_path: Path):
    x = random_images(40, 6, 6, 1)[:, :, :, 0]
    y = np.arange(40) % 4
    np.savez(tmp_path / "arr.npz", x=x, y=y, files=np.array([f"f{i}" for i in range(40)]))
    manifest = ingest(str(tmp_path / "arr.npz"), tmp_path / "out", val_fraction=0.1, test_fraction=0.2)
    assert manifest["source_kind"] == "npz" and manifest["channels"] == {"1": 40}
    assert manifest["splits"]["test"]["labels"] == {str(c): 2 for c in range(4)}
    assert manifest["splits"]["val"]["labels"] == {str(c): 1 for c in range(4)}
    rows = read_rows(tmp_path / "out")
    for index in (0, 17, 39):
        row = rows[f"arr/{index:02d}"]
        assert row["label"] == y[index] and np.array_equal(decode(row["image"]), x[index])


def test_builtin_digits(digits_out: Path):
    manifest = read_manifest(digits_out)
    assert manifest["num_rows"] == 1797 and manifest["num_classes"] == 10
    assert manifest["image_size"] == [8, 8] and manifest["channels"] == {"1": 1797}
    assert manifest["test_split_from"] == "stratified" and manifest["corrupt_count"] == 0
    assert sum(split["rows"] for split in manifest["splits"].values()) == 1797
    assert sum(shard["rows"] for shard in manifest["shards"]) == 1797
    assert len(read_rows(digits_out)) == 1797
    assert not list(digits_out.parent.glob("*.tmp-*"))


def test_splits_are_stratified(digits_out: Path):
    rows = read_rows(digits_out)
    per_class = Counter(row["label"] for row in rows.values())
    test = Counter(row["label"] for row in rows.values() if row["split"] == "test")
    val = Counter(row["label"] for row in rows.values() if row["split"] == "val")
    for label, total in per_class.items():
        assert test[label] == int(np.floor(total * 0.2 + 0.5))
        assert val[label] == int(np.floor((total - test[label]) * 0.1 + 0.5))
        assert val[label] > 0


def test_label_fraction_is_class_balanced_nested_and_seeded(tmp_path: Path):
    def labeled_ids(fraction: float, seed: int, name: str) -> set[str]:
        out = tmp_path / name
        manifest = ingest("builtin:digits", out, label_fraction=fraction, seed=seed)
        rows = read_rows(out)
        train = [row for row in rows.values() if row["split"] == "train"]
        assert manifest["splits"]["train"]["unlabeled"] == sum(row["label"] is None for row in train)
        # val and test keep every label
        assert all(row["label"] is not None for row in rows.values() if row["split"] != "train")
        return {row["id"] for row in train if row["label"] is not None}, manifest

    ten, manifest = labeled_ids(0.1, 0, "a")
    per_class = manifest["splits"]["train"]["labels"]
    assert set(per_class) == {str(c) for c in range(10)}
    assert max(per_class.values()) - min(per_class.values()) <= 1  # about 13 per class
    assert sum(per_class.values()) == len(ten)
    assert labeled_ids(0.1, 0, "b")[0] == ten  # same seed, same ids
    assert labeled_ids(0.1, 1, "c")[0] != ten  # another seed, other ids
    assert labeled_ids(0.05, 0, "d")[0] < ten  # smaller fraction, subset


def test_manifest_and_hash_stable_across_ingests(tmp_path: Path, digits_out: Path):
    first = read_manifest(digits_out)
    second = ingest("builtin:digits", tmp_path / "again", seed=0)
    assert second == first
    assert (tmp_path / "again" / MANIFEST_NAME).read_bytes() == (digits_out / MANIFEST_NAME).read_bytes()
    assert first["content_hash"].startswith("sha256:")
    other_seed = ingest("builtin:digits", tmp_path / "seed1", seed=1)
    assert other_seed["content_hash"] != first["content_hash"]
    # The hash covers rows, not their layout in shards.
    resharded = ingest("builtin:digits", tmp_path / "small", seed=0, shard_rows=500, max_shard_bytes=20_000)
    assert resharded["content_hash"] == first["content_hash"]
    assert len(resharded["shards"]) > len(first["shards"])
    for shard in resharded["shards"]:
        table = pq.read_table(tmp_path / "small" / shard["file"])
        assert table.num_rows == shard["rows"] <= 500
        assert sum(len(image) for image in table.column("image").to_pylist()) <= 20_000


def test_interrupted_ingest_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []
    real_write_shard = ingest_module.write_shard

    def failing_write_shard(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(args)
        real_write_shard(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "write_shard", failing_write_shard)
    with pytest.raises(KeyboardInterrupt):
        ingest("builtin:digits", tmp_path / "out", shard_rows=300)
    assert calls  # one shard was written before the interruption
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the temporary folder remains


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="out"):
        ingest("builtin:digits", out)
    with pytest.raises(FileExistsError, match="not an ingest output"):
        ingest("builtin:digits", out, overwrite=True)
    assert (out / "keep.txt").read_text() == "user data"

    done = tmp_path / "done"
    first = ingest("builtin:digits", done, seed=0)
    second = ingest("builtin:digits", done, seed=1, overwrite=True)
    assert read_manifest(done) == second != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "out"]


def test_source_errors_name_the_source(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ingest(str(missing), tmp_path / "out")
    text = tmp_path / "labels.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"unknown source format .*labels\.txt"):
        ingest(str(text), tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match=r"unknown source format .*empty"):
        ingest(str(empty), tmp_path / "out")
    with pytest.raises(ValueError, match="builtin:nope"):
        ingest("builtin:nope", tmp_path / "out")
    with pytest.raises(ValueError, match="download is only supported"):
        ingest(str(empty), tmp_path / "out", download=True)
    with pytest.raises(ValueError, match="label_fraction"):
        ingest("builtin:digits", tmp_path / "out", label_fraction=1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "labels.txt"]


def test_read_manifest_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no ingest manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(ValueError, match="schema_version"):
        read_manifest(tmp_path)
