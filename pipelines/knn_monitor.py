"""What pretraining trains on and what its kNN monitor scores on, decided from the ingest manifest.

Self-supervised pretraining trains on every image of the ``train`` split (``pretrain_splits``), and on nothing else:
the ``val`` split is what the promote stage compares models on, so no training step may see it (not even without its
labels), and the ``test`` split is only reported. Both are read from the evaluate stage on.

The kNN monitor (weighted kNN top-1, ``pretrain.knn_*``) needs labeled rows, and uses the first that exists of
(``monitor_plan``):

1. ``val``: bank = the labeled ``train`` rows, queries = the labeled ``val`` rows;
2. ``held-out``: the labeled rows of ``train`` and ``val`` together, a seeded class-stratified
   ``HELD_OUT_FRACTION`` of them as queries (at least one row of each class stays in the bank), the rest as bank;
3. ``off``: fewer labeled rows than that; the plan says why.

The plan's ``description`` is printed once by rank 0 and set as the run's ``KNN_MONITOR_TAG``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipelines.datasets import load_rows, load_split_tensors, read_manifest, split_labels, stratified_subset
from ssl_core.augment import Normalization
from ssl_core.evaluate import extract_features, knn_accuracy

HELD_OUT_FRACTION = 0.2
"""Share of the labeled rows (per class) that the ``held-out`` monitor queries."""
KNN_MONITOR_TAG = "sslflow.knn_monitor"
_HELD_OUT_STREAM = 20  # random stream of the held-out draw (see datasets.stratified_subset)


def pretrain_splits(manifest: dict) -> list[str]:
    """The splits pretraining reads: ``train`` (never ``val``, the promotion gate's split, nor ``test``)."""
    return [split for split in ("train",) if manifest["splits"].get(split, {}).get("rows", 0) > 0]


def pretrain_rows(manifest: dict) -> int:
    """Rows of ``pretrain_splits``."""
    return sum(manifest["splits"][split]["rows"] for split in pretrain_splits(manifest))


@dataclass(frozen=True)
class MonitorPlan:
    mode: str
    """``val``, ``held-out`` or ``off``."""
    description: str
    """One line for the log: what the bank and the queries are, or why the monitor is off."""


def monitor_plan(manifest: dict) -> MonitorPlan:
    """Which labeled rows the kNN monitor uses (see the module docstring), from the manifest's label counts."""
    splits = manifest["splits"]
    train_labeled = splits.get("train", {}).get("labeled", 0)
    val_labeled = splits.get("val", {}).get("labeled", 0)
    if train_labeled > 0 and val_labeled > 0:
        return MonitorPlan("val", f"kNN monitor: bank = the {train_labeled} labeled train rows, queries = the "
                                  f"{val_labeled} labeled val rows")
    pool = {label: splits.get("train", {}).get("labels", {}).get(label, 0)
            + splits.get("val", {}).get("labels", {}).get(label, 0)
            for label in set(splits.get("train", {}).get("labels", {})) | set(splits.get("val", {}).get("labels", {}))}
    queries = sum(_held_out_count(count) for count in pool.values())
    if queries > 0:
        total = sum(pool.values())
        return MonitorPlan("held-out", f"kNN monitor: no labeled val rows; queries = a held-out {queries} of the "
                                       f"{total} labeled train/val rows (stratified, {HELD_OUT_FRACTION:.0%}), "
                                       f"bank = the other {total - queries}")
    if sum(pool.values()) == 0:
        why = "no labeled rows in the train or val split (the test split is kept for the evaluate stage)"
    else:
        why = f"{sum(pool.values())} labeled train/val rows are too few to hold some out"
    return MonitorPlan("off", f"kNN monitor off: {why}")


def _held_out_count(class_rows: int) -> int:
    """Queries a class of ``class_rows`` labeled rows gives (as ``stratified_subset`` with ``leave_one_out``)."""
    if class_rows < 2:
        return 0
    return min(max(int(class_rows * HELD_OUT_FRACTION + 0.5), 1), class_rows - 1)


class KnnMonitor:
    """Weighted kNN top-1 of an encoder on the labeled rows ``plan`` names (not ``off``); at most ``bank_size``
    bank rows (a seeded random subset). The bank is sampled from the labels alone and only its rows (and the
    queries) are decoded (``split_labels`` / ``load_rows``), so a large train split is never decoded whole."""

    def __init__(self, data_path: str, plan: MonitorPlan, image_size: int, *, normalization: Normalization,
                 device: torch.device, k: int, temperature: float, bank_size: int, seed: int) -> None:
        # Sample first (labels only), then decode the chosen rows: the split is never decoded whole.
        if plan.mode == "val":
            bank_splits: list[str] = ["train"]
            bank_positions, _ = split_labels(data_path, bank_splits)
            self.query_images, self.query_labels = load_split_tensors(data_path, "val", image_size, labeled_only=True)
        elif plan.mode == "held-out":
            labeled = read_manifest(data_path)["splits"]
            bank_splits = [split for split in ("train", "val") if labeled.get(split, {}).get("labeled", 0) > 0]
            positions, labels = split_labels(data_path, bank_splits)
            indices = list(range(len(labels)))
            held_out = stratified_subset(indices, labels.tolist(), HELD_OUT_FRACTION, seed=seed,
                                         stream=_HELD_OUT_STREAM, leave_one_out=True)
            query = np.zeros(len(labels), dtype=bool)
            query[held_out] = True
            bank_positions = positions[~query]
            self.query_images, self.query_labels = load_rows(data_path, bank_splits, positions[query], image_size)
        else:
            raise ValueError(f"the kNN monitor is off: {plan.description}")
        if len(bank_positions) > bank_size:
            keep = torch.randperm(len(bank_positions), generator=torch.Generator().manual_seed(seed))[:bank_size]
            bank_positions = bank_positions[keep.numpy()]
        bank_images, bank_labels = load_rows(data_path, bank_splits, bank_positions, image_size)
        self.bank_images, self.bank_labels = bank_images, bank_labels
        self.num_classes = int(torch.cat([bank_labels, self.query_labels]).max()) + 1
        self.normalization, self.device, self.k, self.temperature = normalization, device, k, temperature

    def __call__(self, encoder: nn.Module) -> float:
        bank = extract_features(encoder, self.bank_images, device=self.device, normalize=self.normalization)
        queries = extract_features(encoder, self.query_images, device=self.device, normalize=self.normalization)
        # kNN on the worker's device (extract_features returns CPU features).
        accuracy = knn_accuracy(bank.to(self.device), self.bank_labels, queries.to(self.device), self.query_labels,
                                num_classes=self.num_classes, k=self.k, temperature=self.temperature)
        return accuracy["top1"]
