"""Ingest stage: turn an image source into Parquet shards (the data contract) plus ``_manifest.json``.

``ingest(source, out)`` reads an image folder, local CIFAR-10/100 or STL-10 files, an ``.npz`` or the
built-in ``digits`` set (see ``ssl_core.sources``), assigns every image to ``train``/``val``/``test``, hides
labels outside a class-balanced labeled fraction, and writes::

    OUT/train-00000.parquet ...   rows (id, image PNG/JPEG bytes, label int32 or null, split), one split
    OUT/val-00000.parquet ...     per file, rows in a seeded random order, bounded rows/bytes per shard
    OUT/test-00000.parquet ...
    OUT/_manifest.json            counts, sizes, corrupt files, content hash (``read_manifest``)

Splits (all seeded, reproducible; each draw uses its own random stream, so changing one fraction does
not reshuffle another):

- test: the source's own test split when it has one (CIFAR, STL-10, ``.npz`` with ``x_test``); otherwise
  a class-stratified ``test_fraction`` of the labeled images.
- val: a class-stratified ``val_fraction`` of the labeled train images (always labeled).
- label_fraction: of the remaining labeled train images, a class-balanced fraction keeps its label, the
  rest get label null. For one seed, the images kept at a smaller fraction are a subset of those kept at
  a larger one. Unlabeled images always go to train.

Atomicity: shards go to a sibling folder ``OUT.tmp-<random>`` that is renamed to ``OUT`` only after
the manifest is written; on any error the temporary folder is removed, so ``OUT`` either does not exist
or is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import tracking
from pipelines.config import PipelineConfig
from pipelines.datasets import MANIFEST_NAME, SPLITS, read_manifest, stratified_subset
from pipelines.records import IngestRecord, StageRecord
from ssl_core.data import (
    PARQUET_SCHEMA, SCHEMA_VERSION, CorruptImage, CorruptImageError, Sample, SourceRecord, encode_png,
)
from ssl_core.sources import ImageSource, open_source

logger = logging.getLogger(__name__)

ROW_GROUP_BYTES = 4 * 2**20
"""Target bytes per Parquet row group: small enough for a reader to hold a few, large enough to scan fast."""

# Independent random streams: np.random.default_rng([seed, stream, ...]) (see stratified_subset).
_TEST_STREAM, _VAL_STREAM, _LABEL_STREAM, _ORDER_STREAM = 0, 1, 2, 3
_LOAD_CHUNK = 1024  # images handed to the loader threads at a time (bounds memory, keeps row order)


def _stratified(indices: list[int], labels: list[int | None], fraction: float, seed: int, stream: int) -> set[int]:
    """``stratified_subset`` of ``indices`` (all labeled) that leaves at least one item of a class out."""
    class_labels = [labels[index] for index in indices]
    return set(stratified_subset(indices, class_labels, fraction, seed=seed, stream=stream, leave_one_out=True))


@dataclass
class SplitAssignment:
    """Per record: its split and its written label (None when unlabeled or hidden by label_fraction)."""

    splits: list[str]
    labels: list[int | None]
    test_from: str  # "source" or "stratified"


def assign_splits(
    records: list[SourceRecord], *, val_fraction: float, test_fraction: float, label_fraction: float, seed: int
) -> SplitAssignment:
    """Assign train/val/test and hide labels (see the module docstring for the rules)."""
    labels = [record.label for record in records]
    splits = [record.origin_split or "" for record in records]
    has_source_test = any(split == "test" for split in splits)
    free = [i for i, split in enumerate(splits) if not split]
    if has_source_test:
        for i in free:
            splits[i] = "train"
    else:
        test = _stratified([i for i in free if labels[i] is not None], labels, test_fraction, seed, _TEST_STREAM)
        for i in free:
            splits[i] = "test" if i in test else "train"
    labeled_train = [i for i, split in enumerate(splits) if split == "train" and labels[i] is not None]
    val = _stratified(labeled_train, labels, val_fraction, seed, _VAL_STREAM)
    for i in val:
        splits[i] = "val"
    remaining = [i for i in labeled_train if i not in val]
    keep = _stratified(remaining, labels, label_fraction, seed, _LABEL_STREAM)
    written = list(labels)
    for i in remaining:
        if i not in keep:
            written[i] = None
    return SplitAssignment(splits, written, "source" if has_source_test else "stratified")


def write_shard(table: pa.Table, path: Path, row_group_rows: int) -> None:
    """Write one Parquet shard: ``row_group_rows`` rows per row group, split dictionary-encoded, statistics
    on split and label (so readers can skip row groups by filter)."""
    pq.write_table(
        table,
        path,
        row_group_size=row_group_rows,
        use_dictionary=["split"],
        write_statistics=["split", "label"],
    )


class ShardWriter:
    """Buffers the rows of one split and writes them as a shard (``{split}-{index:05d}.parquet``) when the
    next row would exceed ``shard_rows`` rows or ``max_shard_bytes`` payload bytes (image + id bytes; the
    file adds a little Parquet overhead). ``shards`` lists what was written: file, split, rows, bytes."""

    def __init__(self, folder: Path, shard_rows: int, max_shard_bytes: int) -> None:
        self.folder = folder
        self.shard_rows = shard_rows
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[dict[str, object]] = []
        self._split = ""
        self._rows: dict[str, list] = {"id": [], "image": [], "label": [], "split": []}
        self._bytes = 0

    def add(self, row_id: str, image: bytes, label: int | None, split: str) -> None:
        row_bytes = len(image) + len(row_id)
        if split != self._split or len(self._rows["id"]) >= self.shard_rows or (
            self._rows["id"] and self._bytes + row_bytes > self.max_shard_bytes
        ):
            self.flush()
            self._split = split
        self._rows["id"].append(row_id)
        self._rows["image"].append(image)
        self._rows["label"].append(label)
        self._rows["split"].append(split)
        self._bytes += row_bytes

    def flush(self) -> None:
        count = len(self._rows["id"])
        if not count:
            return
        index = sum(1 for shard in self.shards if shard["split"] == self._split)
        name = f"{self._split}-{index:05d}.parquet"
        table = pa.Table.from_pydict(self._rows, schema=PARQUET_SCHEMA)
        row_group_rows = max(1, min(count, ROW_GROUP_BYTES * count // max(self._bytes, 1)))
        write_shard(table, self.folder / name, row_group_rows)
        size = (self.folder / name).stat().st_size
        self.shards.append({"file": name, "split": self._split, "rows": count, "bytes": size})
        self._rows = {"id": [], "image": [], "label": [], "split": []}
        self._bytes = 0


def _check_fraction(name: str, value: float, *, allow_one: bool) -> None:
    upper_ok = value <= 1 if allow_one else value < 1
    if not (0 <= value and upper_ok):
        raise ValueError(f"{name}={value} is out of range [0, {'1]' if allow_one else '1)'}")


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(f"ingest output {str(out)!r} already exists and is not empty (pass overwrite=True)")
    if not (out / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"ingest output {str(out)!r} is not an ingest output (no {MANIFEST_NAME}); refusing to overwrite it"
        )


def ingest(
    source: str,
    out: Path | str,
    *,
    val_fraction: float = 0.1,
    label_fraction: float = 1.0,
    test_fraction: float = 0.2,
    seed: int = 0,
    shard_rows: int = 8192,
    max_shard_bytes: int = 64 * 2**20,
    download: bool = False,
    overwrite: bool = False,
    workers: int = min(8, os.cpu_count() or 1),
    npz_keys: Mapping[str, str] | None = None,
) -> dict:
    """Write ``source`` as Parquet shards + ``_manifest.json`` into ``out`` (atomically); return the manifest.

    ``source``: ``builtin:digits``, ``KIND:PATH`` or a path (see ``open_source``). ``test_fraction`` is used
    only when the source has no test split of its own. ``overwrite`` replaces an earlier ingest output
    (a folder holding ``_manifest.json``); any other non-empty ``out`` is refused. ``workers`` threads
    decode, verify and encode images; the output does not depend on it. ``npz_keys`` names the arrays of an
    ``.npz`` source by role (``{"x": "train_images"}``, see ``ssl_core.sources.NpzSource``); the manifest records it.
    """
    _check_fraction("val_fraction", val_fraction, allow_one=False)
    _check_fraction("test_fraction", test_fraction, allow_one=False)
    _check_fraction("label_fraction", label_fraction, allow_one=True)
    if shard_rows < 1 or max_shard_bytes < 1 or workers < 1:
        raise ValueError(
            f"shard_rows, max_shard_bytes and workers must be positive, got {shard_rows}, {max_shard_bytes}, {workers}"
        )
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)
    started = time.perf_counter()

    image_source = open_source(source, download=download, npz_keys=npz_keys)
    records = image_source.records()
    if not records:
        raise ValueError(f"ingest source {source!r} holds no images")
    duplicates = [row_id for row_id, count in Counter(r.id for r in records).items() if count > 1]
    if duplicates:
        raise ValueError(f"ingest source {source!r} has duplicate ids, e.g. {duplicates[:3]}")
    assignment = assign_splits(
        records, val_fraction=val_fraction, test_fraction=test_fraction, label_fraction=label_fraction, seed=seed
    )
    order_rng = np.random.default_rng([seed, _ORDER_STREAM])

    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f"{out.name}.tmp-{secrets.token_hex(4)}"
    temporary.mkdir()
    try:
        writer = ShardWriter(temporary, shard_rows, max_shard_bytes)
        corrupt: list[CorruptImage] = []
        row_digests: list[bytes] = []
        label_counts: dict[str, Counter] = {split: Counter() for split in SPLITS}
        row_counts: Counter = Counter()
        sizes: Counter = Counter()
        channels: Counter = Counter()
        with ThreadPoolExecutor(max_workers=workers) as executor:
            for split in SPLITS:
                members = np.asarray([i for i, s in enumerate(assignment.splits) if s == split], dtype=np.int64)
                order = members[order_rng.permutation(len(members))].tolist()
                load = partial(_load_encoded, image_source)
                for start in range(0, len(order), _LOAD_CHUNK):
                    for loaded in executor.map(load, order[start : start + _LOAD_CHUNK]):
                        if isinstance(loaded, CorruptImage):
                            corrupt.append(loaded)
                            continue
                        index, sample, encoded = loaded
                        label = assignment.labels[index]
                        writer.add(sample.id, encoded, label, split)
                        row_digests.append(_row_digest(sample.id, encoded, label, split))
                        row_counts[split] += 1
                        label_counts[split]["unlabeled" if label is None else str(label)] += 1
                        sizes[sample.image.shape[:2]] += 1
                        channels[sample.image.shape[2]] += 1
        writer.flush()
        if not row_counts:
            raise ValueError(f"ingest source {source!r}: every image is corrupt ({len(corrupt)} files)")
        manifest = _build_manifest(
            source=source,
            image_source=image_source,
            parameters={
                "seed": seed,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "label_fraction": label_fraction,
                "shard_rows": shard_rows,
                "max_shard_bytes": max_shard_bytes,
                **({"npz_keys": dict(npz_keys)} if npz_keys else {}),
            },
            test_from=assignment.test_from,
            row_counts=row_counts,
            label_counts=label_counts,
            sizes=sizes,
            channels=channels,
            corrupt=corrupt,
            shards=writer.shards,
            content_hash=hashlib.sha256(b"".join(sorted(row_digests))).hexdigest(),
        )
        (temporary / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info(
        "ingested %s -> %s: %s rows (%s), %d corrupt, %.1f s",
        source,
        out,
        manifest["num_rows"],
        ", ".join(f"{split} {row_counts[split]}" for split in SPLITS),
        len(corrupt),
        time.perf_counter() - started,
    )
    return manifest


def _load_encoded(image_source: ImageSource, index: int) -> tuple[int, Sample, bytes] | CorruptImage:
    """Load image ``index`` and its bytes to store (the original PNG/JPEG, else a new PNG); runs in a thread
    (PIL and zlib release the GIL while decoding and compressing)."""
    try:
        sample = image_source.load(index)
    except CorruptImageError as error:
        return error.corrupt
    return index, sample, sample.encoded if sample.encoded is not None else encode_png(sample.image)


def _row_digest(row_id: str, image: bytes, label: int | None, split: str) -> bytes:
    """sha256 of one row (id, image bytes, label, split), unambiguous thanks to length prefixes."""
    digest = hashlib.sha256()
    for part in (row_id.encode(), image, b"null" if label is None else str(label).encode(), split.encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.digest()


def _build_manifest(
    *,
    source: str,
    image_source: ImageSource,
    parameters: dict[str, object],
    test_from: str,
    row_counts: Counter,
    label_counts: dict[str, Counter],
    sizes: Counter,
    channels: Counter,
    corrupt: list[CorruptImage],
    shards: list[dict[str, object]],
    content_hash: str,
) -> dict:
    """The ``_manifest.json`` document (no timestamps, so equal inputs give equal manifests)."""
    splits = {}
    for split in SPLITS:
        counts = label_counts[split]
        unlabeled = counts.get("unlabeled", 0)
        splits[split] = {
            "rows": row_counts[split],
            "labeled": row_counts[split] - unlabeled,
            "unlabeled": unlabeled,
            "labels": {label: counts[label] for label in sorted((k for k in counts if k != "unlabeled"), key=int)},
        }
    labels_seen = {int(label) for split in splits.values() for label in split["labels"]}
    class_names = image_source.class_names
    most_common_sizes = sorted(sizes.items(), key=lambda item: (-item[1], item[0]))
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "source_kind": image_source.kind,
        **parameters,
        "test_split_from": test_from,
        "num_rows": sum(row_counts.values()),
        "num_unlabeled": sum(split["unlabeled"] for split in splits.values()),
        "num_classes": len(class_names) if class_names else (max(labels_seen) + 1 if labels_seen else 0),
        "class_names": class_names,
        "splits": splits,
        "image_size": list(most_common_sizes[0][0]) if len(sizes) == 1 else None,
        "image_sizes": [[height, width, count] for (height, width), count in most_common_sizes[:20]],
        "num_image_sizes": len(sizes),
        "channels": {str(c): n for c, n in sorted(channels.items())},
        "corrupt_count": len(corrupt),
        "corrupt": [{"path": item.path, "reason": item.reason} for item in corrupt],
        "shards": shards,
        "content_hash": f"sha256:{content_hash}",
    }


def _replace(temporary: Path, out: Path) -> None:
    """Move the finished ``temporary`` folder to ``out``, replacing an empty folder or an old ingest output."""
    if not out.exists():
        os.rename(temporary, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.rename(temporary, out)
        return
    previous = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
    os.rename(out, previous)
    os.rename(temporary, out)
    shutil.rmtree(previous)


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> IngestRecord:
    """Pipeline stage: make sure ``cfg.data.path`` holds the ingest of ``cfg.data.source``; log its manifest.

    An existing output with the same source, seed and fractions is kept (its content hash identifies it);
    anything else at that path that ``ingest`` wrote is replaced.
    """
    data = cfg.data
    wanted = {"source": data.source, "seed": data.seed, "val_fraction": data.val_fraction,
              "npz_keys": dict(data.npz_keys) or None}
    manifest = None
    if (Path(data.path) / MANIFEST_NAME).is_file():
        existing = read_manifest(data.path)
        if all(existing.get(key) == value for key, value in wanted.items()):
            manifest = existing
    if manifest is None:
        manifest = ingest(data.source, data.path, val_fraction=data.val_fraction, seed=data.seed, overwrite=True,
                          npz_keys=data.npz_keys)
    tracking.log_json(cfg.tracking, run_id, manifest, MANIFEST_NAME)
    metrics = {**{f"{split}_rows": info["rows"] for split, info in manifest["splits"].items()},
               "corrupt_images": manifest["corrupt_count"]}
    tracking.log_metrics(cfg.tracking, run_id, [(0, metrics)])
    return IngestRecord(path=data.path, content_hash=manifest["content_hash"], num_classes=manifest["num_classes"],
                        metrics=metrics)
