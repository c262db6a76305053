"""The pipeline's data contract: the layout of an ingest output, the seeded stratified subset, and the readers.

An ingest output (written by ``pipelines.stages.ingest``) is a folder of Parquet shards, one split per shard,
plus ``_manifest.json`` (``MANIFEST_NAME``, read with ``read_manifest``); the splits are ``SPLITS``. The folder is a
local path or an object-store URI (``s3://``, ``gs://``; ``pipelines.storage``). The manifest is the commit point:
it is written last, it lists every shard (paths relative to the folder), and the readers open only the shards it
lists, so shards without a manifest (an interrupted ingest) are never read.
``stratified_subset`` is the one seeded, class-stratified draw: ingest uses it to assign splits and hide
labels, ``labeled_subset_ids`` to pick the labeled fraction that fine-tuning sees.

Readers, one per job:

- ``read_split`` returns a lazy, streaming ``ray.data.Dataset``. It is what training uses: Ray Data reads
  the shards in parallel tasks, decodes in batches, and ``Dataset.streaming_split`` / Ray Train's dataset
  shards feed each DDP worker its part without any worker holding the whole split. It needs a running
  Ray and pays a task-scheduling start-up cost.
- ``load_split_tensors`` reads a split with pyarrow in the calling process and returns two tensors. It
  is for small evaluation sets that are used whole and repeatedly (the kNN monitor's bank, the test
  split for linear probes), where a streaming pipeline would only add latency and a Ray dependency.

- ``split_labels`` + ``load_rows`` sample before decoding: the labels of a split (two small columns), then only
  the chosen rows decoded, streaming the shards a record batch at a time (the kNN monitor's bank).

``read_split(materialize=True)`` reads and decodes the rows once and keeps them decoded in Ray's object store, so
every epoch streams them from there instead of re-reading and re-decoding every shard (and re-filtering it, for the
labeled rows of a 1% fine-tune). The training stages pass ``materialize=IF_FITS``: materialize whenever the decoded
rows fit (``should_materialize``), stream otherwise.

All decode with ``ssl_core.data.decode_images`` (RGB, bilinear resize + center crop to ``image_size``)
and give images as uint8 (N, 3, S, S) and labels as int64 with -1 for unlabeled. ``read_split`` also gives
``row_index`` int64: the row's position among all rows of the requested splits in manifest shard order
(``0 .. rows - 1`` for one split, whatever is filtered or dropped), which memory-bank methods (NPID, PCL, ...)
use as the image's slot in their bank. An image that cannot be
decoded (ingest verified every image, so this means damage after ingest) is dropped and counted in a
warning, never raised mid-epoch.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Iterator, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipelines.storage import Location, check_reachable, is_file, locate, read_text
from ssl_core.data import SCHEMA_VERSION, decode_images
from ssl_core.methods.base import ROW_INDEX

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
SPLITS = ("train", "val", "test")
"""The splits of an ingest output, in the order ingest writes them."""
UNLABELED = -1
"""Label value given to rows whose Parquet label is null."""

READ_CPUS = 0.25
"""CPUs each Ray Data read/decode task requests: fractional, so that on a small machine whose Train workers hold
most CPUs the readers still get scheduled instead of stalling the workers they feed."""

_COLUMNS = ["id", "image", "label", "split"]
Key = TypeVar("Key", int, str)
_SUBSET_STREAM = 10  # random stream of labeled_subset_ids; ingest uses 0-3 (see stratified_subset)


def _manifest_location(path: Path | str) -> Location:
    location = locate(path)
    return location if location.uri.endswith("/" + MANIFEST_NAME) else location.child(MANIFEST_NAME)


def has_manifest(dataset_dir: Path | str) -> bool:
    """Whether ``dataset_dir`` (a folder or URI) holds a committed ingest output (its ``_manifest.json``); an
    unreachable object store raises ``StorageError`` naming the URI."""
    location = _manifest_location(dataset_dir)
    check_reachable(location)
    return is_file(location)


def read_manifest(path: Path | str) -> dict:
    """Load ``_manifest.json`` from an ingest output folder or URI (or the file itself) and check its version.

    No manifest (nothing ingested, or an ingest interrupted before its commit) raises ``FileNotFoundError``."""
    manifest_path = _manifest_location(path)
    check_reachable(manifest_path)
    if not is_file(manifest_path):
        raise FileNotFoundError(f"no ingest manifest at {manifest_path.uri!r} (run `sslflow ingest` first; shards "
                                "without a manifest are an unfinished ingest and are never read)")
    manifest = json.loads(read_text(manifest_path))
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{manifest_path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    return manifest


def _stratified_count(size: int, fraction: float, *, leave_one_out: bool) -> int:
    """How many of a class's ``size`` items a ``fraction`` takes.

    ``fraction <= 0`` -> 0, ``fraction >= 1`` -> ``size``; otherwise ``floor(size * fraction + 0.5)`` clamped to
    [1, size]. With ``leave_one_out`` the clamp is [1, size - 1] (at least one item stays out), and a class of
    one item takes ``floor(fraction + 0.5)`` (0 or 1).
    """
    if fraction <= 0 or size == 0:
        return 0
    if fraction >= 1:
        return size
    count = math.floor(size * fraction + 0.5)
    if leave_one_out:
        return min(max(count, 1), size - 1) if size >= 2 else count
    return min(max(count, 1), size)


def stratified_subset(
    keys: Sequence[Key], labels: Sequence[int], fraction: float, *, seed: int, stream: int, leave_one_out: bool
) -> list[Key]:
    """The seeded, class-stratified subset of ``keys`` (one label per key), sorted.

    Per class: its keys in sorted order, permuted by ``np.random.default_rng([seed, stream, label])``; the first
    ``_stratified_count(n, fraction, leave_one_out=...)`` are taken. The permutation does not depend on
    ``fraction``, so for one seed and stream a smaller fraction's subset is contained in a larger one's.
    Streams: ingest's test/val/label draws use 0, 1, 2 (3 orders the rows), ``labeled_subset_ids`` 10.
    """
    by_class: dict[int, list[Key]] = {}
    for key, label in zip(keys, labels, strict=True):
        by_class.setdefault(int(label), []).append(key)
    chosen: list[Key] = []
    for label, members in by_class.items():
        members.sort()
        permutation = np.random.default_rng([seed, stream, label]).permutation(len(members))
        count = _stratified_count(len(members), fraction, leave_one_out=leave_one_out)
        chosen.extend(members[index] for index in permutation[:count])
    return sorted(chosen)


def _split_names(splits: str | list[str]) -> list[str]:
    names = [splits] if isinstance(splits, str) else list(splits)
    if not names:
        raise ValueError("no split requested")
    return names


def split_files(dataset_dir: Path | str, splits: str | list[str]) -> list[str]:
    """The shard files holding ``splits`` (absolute paths or URIs, in manifest order), from the manifest; unknown
    or empty splits raise ``ValueError``."""
    manifest = read_manifest(dataset_dir)
    names = _split_names(splits)
    for name in names:
        if name not in manifest["splits"]:
            raise ValueError(f"unknown split {name!r} in {dataset_dir}; known: {', '.join(manifest['splits'])}")
        if manifest["splits"][name]["rows"] == 0:
            raise ValueError(f"split {name!r} of {dataset_dir} has no rows")
    folder = locate(dataset_dir)
    return [folder.child(shard["file"]).uri for shard in manifest["shards"] if shard["split"] in names]


def read_shards(files: list[str], columns: list[str], **read_options) -> pa.Table:
    """The rows of shard ``files`` (paths or URIs of one file system, from ``split_files``) as one table."""
    locations = [locate(file) for file in files]
    return pq.read_table([location.path for location in locations], columns=columns,
                         filesystem=locations[0].filesystem, **read_options)


def decode_table(table: pa.Table, image_size: int) -> dict[str, np.ndarray]:
    """Decode a table of contract rows into ``{"image": uint8 (N, 3, S, S), "label": int64 (N,)}`` (plus
    ``"row_index"`` int64 (N,) when the table has that column).

    Rows whose image cannot be decoded are dropped and logged with their ids.
    """
    images, failed = decode_images(table.column("image").to_pylist(), image_size)
    labels = table.column("label").fill_null(UNLABELED).to_numpy(zero_copy_only=False).astype(np.int64)
    row_index = (table.column(ROW_INDEX).to_numpy(zero_copy_only=False).astype(np.int64)
                 if ROW_INDEX in table.column_names else None)
    if failed:
        ids = table.column("id").take(pa.array(failed)).to_pylist()
        logger.warning("dropped %d undecodable images: %s", len(failed), ", ".join(ids[:10]))
        labels = np.delete(labels, failed)
        row_index = None if row_index is None else np.delete(row_index, failed)
    decoded = {"image": images.numpy(), "label": labels}
    if row_index is not None:
        decoded[ROW_INDEX] = row_index
    return decoded


def hide_labels(table: pa.Table, labeled_ids: Collection[str]) -> pa.Table:
    """``table`` with the label of every row whose ``id`` is not in ``labeled_ids`` set to null (unlabeled)."""
    keep = pc.is_in(table.column("id"), value_set=_id_array(labeled_ids))
    labels = pc.if_else(keep, table.column("label"), pa.scalar(None, table.schema.field("label").type))
    return table.set_column(table.schema.get_field_index("label"), "label", labels)


def _id_array(labeled_ids: Collection[str]) -> pa.Array:
    return labeled_ids if isinstance(labeled_ids, pa.Array) else pa.array(sorted(labeled_ids), pa.string())


def _read_shards(
    shards: dict[str, np.ndarray],
    *,
    names: list[str],
    labeled_only: bool,
    labeled_ids: pa.Array | None,
    image_size: int,
    batch_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """The ``map_batches`` function of ``read_split``: stream the given shard files in ``batch_size``-row record
    batches, number the rows (``row_index``, from the shard's ``first_row``), hide labels outside ``labeled_ids``,
    keep the requested rows and decode them."""
    for path, first_row in zip(shards["path"], shards["first_row"], strict=True):
        position = int(first_row)
        for record_batch in _iter_batches(str(path), batch_size):
            table = pa.Table.from_batches([record_batch])
            table = table.append_column(ROW_INDEX, pa.array(np.arange(position, position + table.num_rows)))
            position += table.num_rows
            if labeled_ids is not None:
                table = hide_labels(table, labeled_ids)
            mask = pc.is_in(table.column("split"), value_set=pa.array(names))
            if labeled_only:
                mask = pc.and_(mask, pc.is_valid(table.column("label")))
            table = table.filter(mask)
            if table.num_rows:
                yield decode_table(table, image_size)


def _iter_batches(path: str, batch_size: int) -> Iterator[pa.RecordBatch]:
    """Stream one shard (path or URI) in ``batch_size``-row record batches. The file system is rebuilt from the URI
    here, in the reading task, so a task on another node uses that node's credentials."""
    shard = locate(path)
    with shard.filesystem.open_input_file(shard.path) as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=_COLUMNS)


def _shard_rows(dataset_dir: Path | str, files: list[str]) -> list[int]:
    """The row count of each of ``files`` (shard paths or URIs), from the manifest."""
    folder = locate(dataset_dir)
    rows = {folder.child(shard["file"]).uri: int(shard["rows"]) for shard in read_manifest(dataset_dir)["shards"]}
    return [rows[path] for path in files]


def _first_rows(shard_rows: list[int]) -> list[int]:
    """The ``row_index`` of the first row of each shard (in manifest order): the rows of the shards before it."""
    return list(accumulate(shard_rows, initial=0))[:-1]


def read_split(
    dataset_dir: Path | str,
    splits: str | list[str],
    *,
    image_size: int,
    labeled_only: bool = False,
    batch_size: int = 256,
    labeled_ids: Collection[str] | None = None,
    materialize: bool | Literal["if_fits"] = False,
):
    """A Ray Dataset of ``splits`` with columns ``image`` uint8 (3, S, S) per row, ``label`` int64 (-1 =
    unlabeled) and ``row_index`` int64 (the row's position in the requested splits, see the module docstring).

    Only the shards of the requested splits are opened (the manifest lists them; ingest writes one split per
    shard). ``labeled_ids`` (e.g. from ``labeled_subset_ids``) hides every label whose row id is not in it,
    before ``labeled_only`` drops unlabeled rows, so ``labeled_only=True, labeled_ids=ids`` yields exactly the
    rows of ``ids``.

    One ``map_batches`` task per shard streams it in ``batch_size``-row record batches and decodes them; every
    task requests ``READ_CPUS``.

    ``materialize``: read and decode the selected rows once, now, and keep them decoded (uint8) in Ray's object
    store; every epoch then streams them from there, with no read or decode task. It holds
    rows x 3 x S x S bytes in the object store. ``materialize=IF_FITS`` (the training stages): materialize when
    ``should_materialize`` says these rows fit, counting ``len(labeled_ids)`` rows for ``labeled_only`` with
    ``labeled_ids``, else every row of the splits' shards (an upper bound under ``labeled_only``); stream otherwise.

    The shard list comes from the manifest rather than ``ray.data.read_parquet``
    because the latter also runs listing / schema-sampling tasks that need a whole CPU (not configurable in
    Ray 2.60), which never start while Train workers hold all but a fraction of a CPU.
    """
    import ray.data

    names = _split_names(splits)
    files = split_files(dataset_dir, names)
    shard_rows = _shard_rows(dataset_dir, files)
    if materialize == IF_FITS:
        selected = len(labeled_ids) if labeled_only and labeled_ids is not None else sum(shard_rows)
        materialize = should_materialize(selected, image_size)
    shards = ray.data.from_items([{"path": path, "first_row": first_row}
                                  for path, first_row in zip(files, _first_rows(shard_rows), strict=True)])
    rows = shards.map_batches(
        _read_shards,
        fn_kwargs={
            "names": names,
            "labeled_only": labeled_only,
            "labeled_ids": None if labeled_ids is None else _id_array(labeled_ids),
            "image_size": image_size,
            "batch_size": batch_size,
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=READ_CPUS,
    )
    return rows.materialize() if materialize else rows


IF_FITS = "if_fits"
"""``read_split(materialize=IF_FITS)``: keep the decoded rows in the object store when ``should_materialize``."""

MATERIALIZE_BYTES = 2 * 2**30
"""Most decoded bytes that a training stage keeps in Ray's object store (``should_materialize``)."""


def should_materialize(rows: int, image_size: int) -> bool:
    """Whether ``rows`` decoded images of ``image_size`` (``rows x 3 x S x S`` bytes) are few enough to keep in Ray's
    object store for a whole training run (``read_split(materialize=True)``): at most ``MATERIALIZE_BYTES`` and at
    most a quarter of the object store of the Ray that this process is connected to (when connected)."""
    import ray

    decoded = rows * 3 * image_size * image_size
    limit = MATERIALIZE_BYTES
    if ray.is_initialized():
        limit = min(limit, ray.cluster_resources().get("object_store_memory", limit) / 4)
    return decoded <= limit


def load_split_tensors(
    dataset_dir: Path | str,
    splits: str | list[str],
    image_size: int,
    labeled_only: bool = True,
    labeled_ids: Collection[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``splits`` whole, without Ray: ``(images uint8 (N, 3, S, S), labels int64 (N,))``, -1 = unlabeled.

    Rows come in shard order (the seeded order ingest wrote), so repeated calls give the same tensors.
    ``labeled_ids`` hides labels outside it before ``labeled_only`` applies, as in ``read_split``.
    """
    names = _split_names(splits)
    files = split_files(dataset_dir, names)
    table = read_shards(files, _COLUMNS)
    if labeled_ids is not None:
        table = hide_labels(table, labeled_ids)
    mask = pc.is_in(table.column("split"), value_set=pa.array(names))
    if labeled_only:
        mask = pc.and_(mask, pc.is_valid(table.column("label")))
    decoded = decode_table(table.filter(mask), image_size)
    return torch.from_numpy(decoded["image"]), torch.from_numpy(decoded["label"])


def split_labels(dataset_dir: Path | str, splits: str | list[str],
                 labeled_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, labels)`` int64 of the rows of ``splits`` (with a label, if ``labeled_only``), reading only the
    ``label`` and ``split`` columns: ``positions`` index the rows of ``split_files(splits)`` in order, as
    ``load_rows`` takes them. For sampling before decoding."""
    names = _split_names(splits)
    table = read_shards(split_files(dataset_dir, names), ["label", "split"])
    mask = pc.is_in(table.column("split"), value_set=pa.array(names))
    if labeled_only:
        mask = pc.and_(mask, pc.is_valid(table.column("label")))
    mask_array = mask.to_numpy(zero_copy_only=False).astype(bool)
    labels = table.column("label").fill_null(UNLABELED).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.flatnonzero(mask_array).astype(np.int64), labels[mask_array]


def load_rows(dataset_dir: Path | str, splits: str | list[str], positions: Sequence[int] | np.ndarray,
              image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode only the rows at ``positions`` (from ``split_labels``), streaming the shards one record batch at a
    time: ``(images uint8 (N, 3, S, S), labels int64 (N,))`` in position order, undecodable rows dropped as in
    ``decode_table``. Memory: one record batch of encoded rows plus the chosen rows decoded."""
    wanted = np.unique(np.asarray(positions, dtype=np.int64))
    images, labels, offset = [], [], 0
    for path in split_files(dataset_dir, splits):
        for record_batch in _iter_batches(path, 1024):
            end = offset + record_batch.num_rows
            chosen = wanted[(wanted >= offset) & (wanted < end)] - offset
            offset = end
            if len(chosen):
                decoded = decode_table(pa.Table.from_batches([record_batch]).take(pa.array(chosen)), image_size)
                images.append(torch.from_numpy(decoded["image"]))
                labels.append(torch.from_numpy(decoded["label"]))
    if not images:
        return torch.empty((0, 3, image_size, image_size), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return torch.cat(images), torch.cat(labels)


def labeled_subset_ids(dataset_dir: Path | str, split: str, fraction: float, seed: int) -> list[str]:
    """Ids of the seeded, class-stratified subset of the labeled rows of ``split`` (sorted).

    ``stratified_subset`` of the ids with ``leave_one_out=False``: per class of ``n`` labeled rows,
    ``floor(fraction * n + 0.5)`` ids, at least 1 and at most ``n``; for one seed a smaller fraction's subset is
    contained in a larger one's. Reads only the ``id``, ``label`` and ``split`` columns.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    files = split_files(dataset_dir, split)
    table = read_shards(files, ["id", "label", "split"])
    table = table.filter(pc.and_(pc.equal(table.column("split"), split), pc.is_valid(table.column("label"))))
    if table.num_rows == 0:
        raise ValueError(f"split {split!r} of {dataset_dir} has no labeled rows")
    ids = table.column("id").to_pylist()
    labels = table.column("label").to_pylist()
    return stratified_subset(ids, labels, fraction, seed=seed, stream=_SUBSET_STREAM, leave_one_out=False)
