"""What pretraining trains on (every train and val image) and which labeled rows its kNN monitor uses, on real
ingest outputs; no Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import random_images
from torch import nn

from pipelines.datasets import load_split_tensors, read_manifest
from pipelines.knn_monitor import KnnMonitor, monitor_plan, pretrain_rows, pretrain_splits
from ssl_core.augment import Normalization


def ingested(tmp_path: Path, name: str, val_fraction: float, **arrays: np.ndarray) -> Path:
    np.savez(tmp_path / f"{name}.npz", **arrays)
    out = tmp_path / name
    from pipelines.stages.ingest import ingest

    ingest(str(tmp_path / f"{name}.npz"), out, val_fraction=val_fraction)
    return out


def monitor(path: Path, seed: int = 0) -> KnnMonitor:
    return KnnMonitor(str(path), monitor_plan(read_manifest(path)), 8, normalization=Normalization(),
                      device=torch.device("cpu"), k=3, temperature=0.1, bank_size=1000, seed=seed)


def test_labeled_val_rows_are_the_queries_and_are_never_trained_on(tmp_path: Path) -> None:
    path = ingested(tmp_path, "val", 0.2, x=random_images(40, 8, 8, 3), y=np.arange(40) % 4,
                    x_test=random_images(8, 8, 8, 3, seed=1), y_test=np.arange(8) % 4)
    manifest = read_manifest(path)
    assert pretrain_splits(manifest) == ["train"]
    assert pretrain_rows(manifest) == 32  # the 8 val rows are the promotion gate's: no training step sees them
    plan = monitor_plan(manifest)
    assert plan.mode == "val" and plan.description == \
        "kNN monitor: bank = the 32 labeled train rows, queries = the 8 labeled val rows"
    watcher = monitor(path)
    assert torch.equal(watcher.query_labels, load_split_tensors(path, "val", 8)[1])
    assert 0.0 <= watcher(nn.Flatten()) <= 1.0


def test_without_val_rows_a_stratified_held_out_slice_of_the_labeled_rows_is_queried(tmp_path: Path) -> None:
    labels = np.arange(30) % 3
    path = ingested(tmp_path, "noval", 0.0, x=random_images(30, 8, 8, 3), y=labels,
                    x_test=random_images(6, 8, 8, 3, seed=1), y_test=np.arange(6) % 3)
    manifest = read_manifest(path)
    assert pretrain_splits(manifest) == ["train"] and pretrain_rows(manifest) == 30
    plan = monitor_plan(manifest)
    assert plan.mode == "held-out"
    assert plan.description == ("kNN monitor: no labeled val rows; queries = a held-out 6 of the 30 labeled "
                                "train/val rows (stratified, 20%), bank = the other 24")
    watcher = monitor(path)
    assert watcher.query_labels.bincount().tolist() == [2, 2, 2]  # 20% of each class of 10
    assert watcher.bank_labels.bincount().tolist() == [8, 8, 8]
    # Bank and queries are disjoint and together all the labeled train rows (compared as images).
    images, _ = load_split_tensors(path, "train", 8)
    together = torch.cat([watcher.bank_images, watcher.query_images]).flatten(1)
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, images.flatten(1).tolist()))
    assert torch.equal(monitor(path).query_images, watcher.query_images)  # seeded
    assert 0.0 <= watcher(nn.Flatten()) <= 1.0


def test_unlabeled_train_images_turn_the_monitor_off_and_say_why(tmp_path: Path) -> None:
    path = ingested(tmp_path, "unlabeled", 0.1, x_train=random_images(20, 8, 8, 3),
                    x_test=random_images(10, 8, 8, 3, seed=1), y_test=np.arange(10) % 2)
    manifest = read_manifest(path)
    assert pretrain_splits(manifest) == ["train"] and pretrain_rows(manifest) == 20
    plan = monitor_plan(manifest)
    assert plan.mode == "off"
    assert plan.description == ("kNN monitor off: no labeled rows in the train or val split (the test split is kept "
                                "for the evaluate stage)")
    with pytest.raises(ValueError, match="the kNN monitor is off"):
        monitor(path)


def test_too_few_labeled_rows_to_hold_out_turn_the_monitor_off() -> None:
    manifest = {"splits": {"train": {"rows": 50, "labeled": 3, "labels": {"0": 1, "1": 1, "2": 1}},
                           "val": {"rows": 0, "labeled": 0, "labels": {}}}}
    plan = monitor_plan(manifest)
    assert plan.mode == "off" and plan.description == \
        "kNN monitor off: 3 labeled train/val rows are too few to hold some out"
    assert pretrain_splits(manifest) == ["train"]


def test_the_bank_is_sampled_before_anything_is_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bank of 10 from 160 labeled train rows: only the 10 bank rows and the queries are decoded, and they are
    exactly those rows of the split (labels and pixels)."""
    import pipelines.datasets as datasets

    path = ingested(tmp_path, "big", 0.1, x=random_images(200, 8, 8, 3), y=np.arange(200) % 4)
    decoded = []
    real_decode_images = datasets.decode_images

    def counting_decode_images(encoded, image_size=None):
        decoded.append(len(encoded))
        return real_decode_images(encoded, image_size)

    monkeypatch.setattr(datasets, "decode_images", counting_decode_images)
    watcher = KnnMonitor(str(path), monitor_plan(read_manifest(path)), 8, normalization=Normalization(),
                         device=torch.device("cpu"), k=3, temperature=0.1, bank_size=10, seed=0)
    queries = read_manifest(path)["splits"]["val"]["labeled"]
    assert len(watcher.bank_labels) == 10 and sum(decoded) == 10 + queries
    monkeypatch.setattr(datasets, "decode_images", real_decode_images)
    images, labels = load_split_tensors(path, "train", 8)
    rows = {tuple(image.flatten().tolist()): int(label) for image, label in zip(images, labels, strict=True)}
    for image, label in zip(watcher.bank_images, watcher.bank_labels, strict=True):
        assert rows[tuple(image.flatten().tolist())] == int(label)
