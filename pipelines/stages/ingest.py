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

Shards: each split's rows are cut into chunks of ``shard_rows``; a chunk is one task (threads in this process,
or a Ray task per chunk with ``executor="ray"``) that writes ``{split}-{chunk:05d}.parquet`` (and
``{split}-{chunk:05d}-01.parquet``, ... when it passes ``max_shard_bytes``). The manifest lists them in split and
chunk order; the content hash covers the rows, not their layout.

Atomicity: on a local disk, shards go to a sibling folder ``OUT.tmp-<random>`` that is renamed to ``OUT`` only
after the manifest is written; on any error the temporary folder is removed, so ``OUT`` either does not exist
or is complete. On an object store (``s3://``, ``gs://``; no rename there), shards go under a fresh prefix
``OUT/shards-<random>/`` and the manifest, written last in one put, is the commit point: readers open only what a
manifest lists, an interrupted ingest leaves no manifest (and its prefix is deleted), and an overwrite keeps
the old dataset readable until the new manifest replaces the old one, then deletes the old shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import time
from collections import Counter
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines import tracking
from pipelines.config import DataConfig, PipelineConfig
from pipelines.datasets import MANIFEST_NAME, SPLITS, has_manifest, read_manifest, stratified_subset
from pipelines.records import IngestRecord, StageRecord
from pipelines.storage import Location, check_reachable, delete_folder, list_names, locate, write_text
from ssl_core.data import (
    PARQUET_SCHEMA, SCHEMA_VERSION, CorruptImage, CorruptImageError, Sample, SourceRecord, encode_png,
)
from ssl_core.sources import ImageSource, open_source, source_signature

logger = logging.getLogger(__name__)

ROW_GROUP_BYTES = 4 * 2**20
"""Target bytes per Parquet row group: small enough for a reader to hold a few, large enough to scan fast."""

# Independent random streams: np.random.default_rng([seed, stream, ...]) (see stratified_subset).
_TEST_STREAM, _VAL_STREAM, _LABEL_STREAM, _ORDER_STREAM = 0, 1, 2, 3
MAX_IMAGE_SIDE = 1024
"""Default bound on the longer side of a stored image (pixels): larger originals are downscaled at ingest, which
keeps a shard's decode cost and a worker's memory bounded while leaving a 224 px random-resized crop sharp."""
_LOAD_CHUNK = 1024  # images handed to the loader threads at a time (bounds memory, keeps row order)
EXECUTORS = ("threads", "ray")


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


def write_shard(table: pa.Table, location: Location, row_group_rows: int) -> None:
    """Write one Parquet shard: ``row_group_rows`` rows per row group, split dictionary-encoded, statistics
    on split and label (so readers can skip row groups by filter)."""
    pq.write_table(
        table,
        location.path,
        filesystem=location.filesystem,
        row_group_size=row_group_rows,
        use_dictionary=["split"],
        write_statistics=["split", "label"],
    )


class ShardWriter:
    """Buffers the rows of one chunk (rows of one split) and writes them as shards into ``folder``: ``{stem}.parquet``,
    then ``{stem}-01.parquet``, ... whenever the next row would exceed ``max_shard_bytes`` payload bytes (image + id
    bytes; the file adds a little Parquet overhead). ``shards`` lists what was written: file (relative to the
    dataset folder: ``{folder_name}/`` + the name), split, rows, bytes."""

    def __init__(self, folder: Location, folder_name: str, stem: str, max_shard_bytes: int) -> None:
        self.folder = folder
        self.folder_name = folder_name
        self.stem = stem
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[dict[str, object]] = []
        self._split = ""
        self._rows: dict[str, list] = {"id": [], "image": [], "label": [], "split": []}
        self._bytes = 0

    def add(self, row_id: str, image: bytes, label: int | None, split: str) -> None:
        row_bytes = len(image) + len(row_id)
        if split != self._split or (self._rows["id"] and self._bytes + row_bytes > self.max_shard_bytes):
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
        part = len(self.shards)
        name = f"{self.stem}.parquet" if part == 0 else f"{self.stem}-{part:02d}.parquet"
        table = pa.Table.from_pydict(self._rows, schema=PARQUET_SCHEMA)
        row_group_rows = max(1, min(count, ROW_GROUP_BYTES * count // max(self._bytes, 1)))
        location = self.folder.child(name)
        write_shard(table, location, row_group_rows)
        size = location.filesystem.get_file_info(location.path).size
        self.shards.append({"file": f"{self.folder_name}/{name}" if self.folder_name else name,
                            "split": self._split, "rows": count, "bytes": size})
        self._rows = {"id": [], "image": [], "label": [], "split": []}
        self._bytes = 0


@dataclass
class ChunkResult:
    """What one chunk of rows (one task) wrote and saw; ``merge`` adds another chunk's."""

    shards: list[dict[str, object]] = field(default_factory=list)
    corrupt: list[CorruptImage] = field(default_factory=list)
    row_digests: list[bytes] = field(default_factory=list)
    label_counts: dict[str, Counter] = field(default_factory=lambda: {split: Counter() for split in SPLITS})
    sizes: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)

    def merge(self, other: ChunkResult) -> None:
        self.shards.extend(other.shards)
        self.corrupt.extend(other.corrupt)
        self.row_digests.extend(other.row_digests)
        for split in SPLITS:
            self.label_counts[split].update(other.label_counts[split])
        self.sizes.update(other.sizes)
        self.channels.update(other.channels)


@dataclass(frozen=True)
class Chunk:
    """Rows ``indices`` (source indices, in written order) of ``split`` with their written labels: one task's work,
    written as shard(s) ``{split}-{number:05d}``."""

    split: str
    number: int
    indices: list[int]
    labels: list[int | None]


def ingest_chunk(image_source: ImageSource, chunk: Chunk, folder_uri: str, folder_name: str, max_shard_bytes: int,
                 max_image_side: int, load_map: Callable = map) -> ChunkResult:
    """Load, verify and encode the images of ``chunk`` (through ``load_map``: ``map``, or a thread pool's) and write
    them as shard(s) into ``folder_uri``/``folder_name``. Runs in the driver or as a Ray task."""
    folder = locate(folder_uri)
    writer = ShardWriter(folder.child(folder_name) if folder_name else folder, folder_name,
                         f"{chunk.split}-{chunk.number:05d}", max_shard_bytes)
    result = ChunkResult()
    label_of = dict(zip(chunk.indices, chunk.labels, strict=True))
    load = partial(_load_encoded, image_source, max_image_side)
    for start in range(0, len(chunk.indices), _LOAD_CHUNK):
        for loaded in load_map(load, chunk.indices[start : start + _LOAD_CHUNK]):
            if isinstance(loaded, CorruptImage):
                result.corrupt.append(loaded)
                continue
            index, sample, encoded = loaded
            label = label_of[index]
            writer.add(sample.id, encoded, label, chunk.split)
            result.row_digests.append(_row_digest(sample.id, encoded, label, chunk.split))
            result.label_counts[chunk.split]["unlabeled" if label is None else str(label)] += 1
            result.sizes[sample.image.shape[:2]] += 1
            result.channels[sample.image.shape[2]] += 1
    writer.flush()
    result.shards = writer.shards
    return result


class Progress:
    """A one-line progress report on stderr at most every ``interval`` seconds: files done, files/s, corrupt."""

    def __init__(self, total: int, enabled: bool, interval: float = 2.0) -> None:
        self.total, self.enabled, self.interval = total, enabled, interval
        self.done = self.corrupt = 0
        self.started = self._last = time.perf_counter()

    def update(self, files: int, corrupt: int) -> None:
        self.done += files
        self.corrupt += corrupt
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval or self.done == self.total):
            self._last = now
            rate = self.done / max(now - self.started, 1e-9)
            end = "\n" if self.done == self.total else ""
            print(f"\ringest: {self.done}/{self.total} files, {rate:.0f} files/s, {self.corrupt} corrupt",
                  end=end, file=sys.stderr, flush=True)


def _check_fraction(name: str, value: float, *, allow_one: bool) -> None:
    upper_ok = value <= 1 if allow_one else value < 1
    if not (0 <= value and upper_ok):
        raise ValueError(f"{name}={value} is out of range [0, {'1]' if allow_one else '1)'}")


def _check_out(out: Location, overwrite: bool) -> bool:
    """Refuse an ``out`` that holds anything but an earlier ingest output (and that one unless ``overwrite``);
    return whether ``out`` holds an ingest output (committed: its manifest exists)."""
    check_reachable(out)
    names = list_names(out)
    if not names:
        return False
    if not overwrite:
        raise FileExistsError(f"ingest output {out.uri!r} already exists and is not empty (pass overwrite=True)")
    if MANIFEST_NAME not in names:
        raise FileExistsError(
            f"ingest output {out.uri!r} is not an ingest output (no {MANIFEST_NAME}); refusing to overwrite it"
        )
    return True


def _chunks(assignment: SplitAssignment, order_rng: np.random.Generator, shard_rows: int) -> list[Chunk]:
    """Per split (in ``SPLITS`` order), its rows in a seeded random order, cut into chunks of ``shard_rows``."""
    chunks = []
    for split in SPLITS:
        members = np.asarray([i for i, s in enumerate(assignment.splits) if s == split], dtype=np.int64)
        order = members[order_rng.permutation(len(members))].tolist()
        for number, start in enumerate(range(0, len(order), shard_rows)):
            indices = order[start : start + shard_rows]
            chunks.append(Chunk(split, number, indices, [assignment.labels[i] for i in indices]))
    return chunks


def _run_chunks(image_source: ImageSource, chunks: list[Chunk], folder_uri: str, folder_name: str,
                max_shard_bytes: int, max_image_side: int, *, workers: int, executor: str,
                progress: Progress) -> ChunkResult:
    """Every chunk through ``ingest_chunk``: one after another with ``workers`` loader threads (``threads``), or
    as Ray tasks, one per chunk, one CPU each (``ray``); merged in chunk order, so the output is the same."""
    merged = ChunkResult()
    if executor == "threads":
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for chunk in chunks:
                result = ingest_chunk(image_source, chunk, folder_uri, folder_name, max_shard_bytes, max_image_side,
                                      pool.map)
                progress.update(len(chunk.indices), len(result.corrupt))
                merged.merge(result)
        return merged
    import ray

    source_ref = ray.put(image_source)
    task = ray.remote(num_cpus=1, max_retries=2)(ingest_chunk)
    pending = {task.remote(source_ref, chunk, folder_uri, folder_name, max_shard_bytes, max_image_side): number
               for number, chunk in enumerate(chunks)}
    results: dict[int, ChunkResult] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            number = pending.pop(ready[0])
            results[number] = ray.get(ready[0])
            progress.update(len(chunks[number].indices), len(results[number].corrupt))
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    for number in range(len(chunks)):
        merged.merge(results[number])
    return merged


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
    executor: str = "threads",
    progress: bool = False,
    max_image_side: int = MAX_IMAGE_SIDE,
) -> dict:
    """Write ``source`` as Parquet shards + ``_manifest.json`` into ``out`` (atomically); return the manifest.

    ``source``: ``builtin:digits``, ``KIND:PATH`` or a path (see ``open_source``). ``out``: a local folder or an
    ``s3://`` / ``gs://`` URI (``pipelines.storage``); an unreachable bucket fails before any image is read.
    ``test_fraction`` is used only when the source has no test split of its own. ``overwrite`` replaces an
    earlier ingest output (a folder holding ``_manifest.json``); any other non-empty ``out`` is refused.
    Each split's rows are cut into chunks of ``shard_rows`` (one chunk -> one shard, more when a chunk passes
    ``max_shard_bytes``). ``executor``: ``threads`` runs the chunks one after another, ``workers`` threads
    decoding, verifying and encoding images; ``ray`` runs one Ray task per chunk (a running Ray, or a local one
    started here), so a large folder uses every core of the cluster. Neither changes the output.
    ``progress`` prints files done, files/s and the corrupt count to stderr. An image whose longer side passes
    ``max_image_side`` is stored downscaled to it (aspect kept; JPEG q95 if it was a JPEG, else PNG); smaller
    ones keep their original bytes. ``npz_keys`` names the arrays of
    an ``.npz`` source by role (``{"x": "train_images"}``, see ``ssl_core.sources.NpzSource``); the manifest
    records it.
    """
    _check_fraction("val_fraction", val_fraction, allow_one=False)
    _check_fraction("test_fraction", test_fraction, allow_one=False)
    _check_fraction("label_fraction", label_fraction, allow_one=True)
    if shard_rows < 1 or max_shard_bytes < 1 or workers < 1 or max_image_side < 1:
        raise ValueError(
            f"shard_rows, max_shard_bytes, workers and max_image_side must be positive, got {shard_rows}, "
            f"{max_shard_bytes}, {workers}, {max_image_side}"
        )
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is not one of {', '.join(EXECUTORS)}")
    out_location = locate(out)
    had_output = _check_out(out_location, overwrite)
    started = time.perf_counter()

    image_source = open_source(source, download=download, npz_keys=npz_keys)
    signature = source_signature(source)  # before reading: a change while reading shows at the next comparison
    records = image_source.records()
    if not records:
        raise ValueError(f"ingest source {source!r} holds no images")
    duplicates = [row_id for row_id, count in Counter(r.id for r in records).items() if count > 1]
    if duplicates:
        raise ValueError(f"ingest source {source!r} has duplicate ids, e.g. {duplicates[:3]}")
    assignment = assign_splits(
        records, val_fraction=val_fraction, test_fraction=test_fraction, label_fraction=label_fraction, seed=seed
    )
    chunks = _chunks(assignment, np.random.default_rng([seed, _ORDER_STREAM]), shard_rows)
    if out_location.is_remote:
        # Object stores have no rename: shards go under a fresh prefix of OUT; the manifest, written last in one
        # put, is the commit point (readers open only the shards it lists).
        folder_uri, folder_name = out_location.uri, f"shards-{secrets.token_hex(4)}"
        temporary = out_location.child(folder_name)
    else:
        out_path = Path(out_location.path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        temporary_path = out_path.parent / f"{out_path.name}.tmp-{secrets.token_hex(4)}"
        temporary_path.mkdir()
        folder_uri, folder_name, temporary = str(temporary_path), "", locate(temporary_path)
    try:
        result = _run_chunks(image_source, chunks, folder_uri, folder_name, max_shard_bytes, max_image_side,
                             workers=workers, executor=executor, progress=Progress(len(records), progress))
        row_counts = Counter({split: sum(counts.values()) for split, counts in result.label_counts.items()})
        if not sum(row_counts.values()):
            raise ValueError(f"ingest source {source!r}: every image is corrupt ({len(result.corrupt)} files)")
        manifest = _build_manifest(
            source=source,
            signature=signature,
            image_source=image_source,
            parameters={
                "seed": seed,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "label_fraction": label_fraction,
                "shard_rows": shard_rows,
                "max_shard_bytes": max_shard_bytes,
                **({"max_image_side": max_image_side} if max_image_side != MAX_IMAGE_SIDE else {}),
                **({"npz_keys": dict(npz_keys)} if npz_keys else {}),
            },
            test_from=assignment.test_from,
            row_counts=row_counts,
            label_counts=result.label_counts,
            sizes=result.sizes,
            channels=result.channels,
            corrupt=result.corrupt,
            shards=result.shards,
            content_hash=hashlib.sha256(b"".join(sorted(result.row_digests))).hexdigest(),
        )
        document = json.dumps(manifest, indent=2) + "\n"
        if out_location.is_remote:
            write_text(out_location.child(MANIFEST_NAME), document)
        else:
            (temporary_path / MANIFEST_NAME).write_text(document)
            _replace(temporary_path, out_path)
    except BaseException:
        delete_folder(temporary)
        raise
    if out_location.is_remote and had_output:
        _delete_unlisted(out_location, manifest)
    logger.info(
        "ingested %s -> %s: %s rows (%s), %d corrupt, %.1f s",
        source,
        out_location.uri,
        manifest["num_rows"],
        ", ".join(f"{split} {row_counts[split]}" for split in SPLITS),
        len(result.corrupt),
        time.perf_counter() - started,
    )
    return manifest


def _delete_unlisted(out: Location, manifest: dict) -> None:
    """After an overwrite on an object store: delete the shards of earlier ingests (not listed in ``manifest``)."""
    listed = {shard["file"] for shard in manifest["shards"]} | {MANIFEST_NAME}
    stale = [out.child(name).path for name in list_names(out) if name not in listed]
    for path in stale:
        out.filesystem.delete_file(path)


def _load_encoded(image_source: ImageSource, max_image_side: int,
                  index: int) -> tuple[int, Sample, bytes] | CorruptImage:
    """Load image ``index`` and its bytes to store (the original PNG/JPEG, else a new PNG; downscaled to
    ``max_image_side`` when larger); runs in a thread (PIL and zlib release the GIL while decoding and compressing)."""
    try:
        sample = image_source.load(index)
    except CorruptImageError as error:
        return error.corrupt
    height, width = sample.image.shape[:2]
    if max(height, width) > max_image_side:
        was_jpeg = sample.encoded is not None and sample.encoded[:2] == b"\xff\xd8"
        scale = max_image_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        pixels = sample.image[:, :, 0] if sample.image.shape[2] == 1 else sample.image
        image = Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        array = np.asarray(image, dtype=np.uint8)
        sample = dataclasses.replace(sample, image=array[:, :, None] if array.ndim == 2 else array, encoded=None)
        if was_jpeg:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            return index, sample, buffer.getvalue()
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
    signature: str,
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
        "source_signature": signature,
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


def dataset_mismatch(data: DataConfig) -> str | None:
    """Why ``data.path`` does not hold the ingest of ``data`` as the source is now (no manifest; another source,
    seed, val_fraction or npz_keys; the source changed since: ``source_signature``), or None when it does."""
    if not has_manifest(data.path):
        return f"no dataset at {data.path}"
    existing = read_manifest(data.path)
    wanted = {"source": data.source, "seed": data.seed, "val_fraction": data.val_fraction,
              "npz_keys": dict(data.npz_keys) or None}
    differing = [key for key, value in wanted.items() if existing.get(key) != value]
    if differing:
        return f"the dataset at {data.path} was ingested with another {', '.join(differing)}"
    if existing.get("source_signature") != source_signature(data.source):
        return f"the source {data.source} changed since it was ingested to {data.path}"
    return None


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord], *, force: bool = False) -> IngestRecord:
    """Pipeline stage: make sure ``cfg.data.path`` holds the ingest of ``cfg.data.source``; log its manifest.

    An existing output of the same source (as it is now: ``dataset_mismatch``), seed and fractions is kept (its
    content hash identifies it) unless ``force`` (``sslflow run --force ingest``: read the source again and rewrite);
    anything else at that path that ``ingest`` wrote is replaced.
    """
    data = cfg.data
    if force or dataset_mismatch(data) is not None:
        manifest = ingest(data.source, data.path, val_fraction=data.val_fraction, seed=data.seed, overwrite=True,
                          npz_keys=data.npz_keys)
    else:
        manifest = read_manifest(data.path)
    tracking.log_json(cfg.tracking, run_id, manifest, MANIFEST_NAME)
    metrics = {**{f"{split}_rows": info["rows"] for split, info in manifest["splits"].items()},
               "corrupt_images": manifest["corrupt_count"]}
    tracking.log_metrics(cfg.tracking, run_id, [(0, metrics)])
    return IngestRecord(path=data.path, content_hash=manifest["content_hash"], num_classes=manifest["num_classes"],
                        metrics=metrics)
