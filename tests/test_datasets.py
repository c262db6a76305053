"""Reading ingest outputs: Ray Data (read_split, real local Ray) and pyarrow (load_split_tensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.datasets import load_split_tensors, read_manifest, read_split, stratified_subset
from pipelines.stages.ingest import ingest


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


@pytest.mark.parametrize(
    ("fraction", "seed", "stream", "expected"),
    [  # the draws of ingest's split assignment before stratified_subset served both callers
        (0.3, 0, 0, [5, 8, 11, 12, 15]),
        (0.5, 1, 2, [2, 3, 6, 9, 10, 11, 12, 13, 15]),
        (0.75, 4, 1, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15]),
        (0.1, 2, 0, [7, 8, 9, 15]),
    ],
)
def test_stratified_subset_leave_one_out_keeps_ingest_draws(fraction, seed, stream, expected):
    labels = [0, 1, 2, 0, 1, 0, 5, 2, 0, 1, 0, 2, 1, 0, 3, 3]  # class sizes 6, 4, 3, 2 and 1 (class 5)
    chosen = stratified_subset(range(16), labels, fraction, seed=seed, stream=stream, leave_one_out=True)
    assert chosen == expected


@pytest.mark.parametrize(
    ("fraction", "seed", "expected"),
    [  # the subsets of labeled_subset_ids before stratified_subset served both callers
        (0.3, 0, ["id02", "id06", "id08", "id12", "id13", "id15"]),
        (0.5, 1, ["id05", "id06", "id07", "id09", "id10", "id11", "id12", "id13", "id15"]),
        (0.1, 2, ["id02", "id05", "id06", "id12", "id15"]),
    ],
)
def test_stratified_subset_at_least_one_keeps_labeled_subsets(fraction, seed, expected):
    labels = [0, 1, 2, 0, 1, 0, 5, 2, 0, 1, 0, 2, 1, 0, 3, 3]
    ids = [f"id{index:02d}" for index in range(16)]
    chosen = stratified_subset(ids[::-1], labels[::-1], fraction, seed=seed, stream=10, leave_one_out=False)
    assert chosen == expected  # the input order does not matter: each class's ids are sorted first


def test_stratified_subset_count_rules():
    labels = [0] * 10 + [1] * 2 + [2]
    keys = list(range(13))

    def per_class(fraction: float, leave_one_out: bool) -> list[int]:
        chosen = stratified_subset(keys, labels, fraction, seed=0, stream=0, leave_one_out=leave_one_out)
        return [sum(labels[key] == label for key in chosen) for label in (0, 1, 2)]

    assert per_class(0.25, leave_one_out=True) == [3, 1, 0]  # half up; a singleton class may get none
    assert per_class(0.25, leave_one_out=False) == [3, 1, 1]  # at least one per class
    assert per_class(0.96, leave_one_out=True) == [9, 1, 1]  # one of each class of two or more stays out
    assert per_class(0.96, leave_one_out=False) == [10, 2, 1]
    assert per_class(0.0, leave_one_out=True) == [0, 0, 0] and per_class(1.0, leave_one_out=True) == [10, 2, 1]
    small = stratified_subset(keys, labels, 0.3, seed=5, stream=1, leave_one_out=False)
    large = stratified_subset(keys, labels, 0.7, seed=5, stream=1, leave_one_out=False)
    assert set(small) < set(large)  # nested across fractions
    assert stratified_subset(keys, labels, 0.5, seed=6, stream=1, leave_one_out=False) != stratified_subset(
        keys, labels, 0.5, seed=6, stream=2, leave_one_out=False
    )
