"""Reading ingest outputs: Ray Data (read_split, real local Ray) and pyarrow (load_split_tensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.datasets import load_split_tensors, read_split
from pipelines.stages.ingest import ingest, read_manifest


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits with half of the train labels hidden, and one test image damaged after ingest."""
    out = tmp_path_factory.mktemp("datasets") / "digits"
    ingest("builtin:digits", out, label_fraction=0.5, seed=0)
    shard = out / "test-00000.parquet"
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[3] = b"\x89PNG damaged after ingest"
    table = table.set_column(table.schema.get_field_index("image"), "image", [images])
    pq.write_table(table, shard)
    return out


def test_read_split_decodes_filters_and_drops_damaged(ray_session, digits_dir: Path):
    splits = read_manifest(digits_dir)["splits"]

    train = read_split(digits_dir, "train", image_size=16)
    batches = list(train.iter_batches(batch_size=512, batch_format="numpy"))
    assert batches[0]["image"].shape == (512, 3, 16, 16) and batches[0]["image"].dtype == np.uint8
    assert batches[0]["label"].dtype == np.int64
    labels = np.concatenate([batch["label"] for batch in batches])
    assert len(labels) == splits["train"]["rows"]
    assert (labels == -1).sum() == splits["train"]["unlabeled"] > 0

    labeled = read_split(digits_dir, "train", image_size=8, labeled_only=True)
    labeled_labels = np.concatenate([b["label"] for b in labeled.iter_batches(batch_size=512, batch_format="numpy")])
    assert len(labeled_labels) == splits["train"]["labeled"] and labeled_labels.min() >= 0

    evaluation = read_split(digits_dir, ["val", "test"], image_size=8)
    assert evaluation.count() == splits["val"]["rows"] + splits["test"]["rows"] - 1  # the damaged image


def test_read_split_rejects_unknown_split(digits_dir: Path):
    with pytest.raises(ValueError, match="unknown split 'validation'.*train, val, test"):
        read_split(digits_dir, ["train", "validation"], image_size=8)


def test_load_split_tensors(digits_dir: Path):
    splits = read_manifest(digits_dir)["splits"]
    images, labels = load_split_tensors(digits_dir, "test", image_size=12)
    assert images.shape == (splits["test"]["rows"] - 1, 3, 12, 12) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.shape == (len(images),)
    train_images, train_labels = load_split_tensors(digits_dir, "train", image_size=8)
    assert len(train_images) == splits["train"]["labeled"] and train_labels.min() >= 0
    _, all_train_labels = load_split_tensors(digits_dir, "train", image_size=8, labeled_only=False)
    assert (all_train_labels == -1).sum() == splits["train"]["unlabeled"]
    # Same order every call, and the same pixels as the Parquet rows (8x8 -> 8x8 needs no resize).
    again, _ = load_split_tensors(digits_dir, "train", image_size=8)
    assert torch.equal(again, train_images)
    assert torch.equal(train_images[:, 0], train_images[:, 2])  # grayscale digits become RGB
