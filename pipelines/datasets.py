"""The pipeline's data contract: the layout of an ingest output, the seeded stratified subset, and the readers.

An ingest output (written by ``pipelines.stages.ingest``) is a folder of Parquet shards, one split per shard,
plus ``_manifest.json`` (``MANIFEST_NAME``, read with ``read_manifest``); the splits are ``SPLITS``.
``stratified_subset`` is the one seeded, class-stratified draw: ingest uses it to assign splits and hide
labels, ``labeled_subset_ids`` to pick the labeled fraction that fine-tuning sees.

Two readers, for two jobs:

- ``read_split`` returns a lazy, streaming ``ray.data.Dataset``. It is what training uses: Ray Data reads
  the shards in parallel tasks, decodes in batches, and ``Dataset.streaming_split`` / Ray Train's dataset
  shards feed each DDP worker its part without any worker holding the whole split. It needs a running
  Ray and pays a task-scheduling start-up cost.
- ``load_split_tensors`` reads a split with pyarrow in the calling process and returns two tensors. It
  is for small evaluation sets that are used whole and repeatedly (the kNN monitor's bank, the test
  split for linear probes), where a streaming pipeline would only add latency and a Ray dependency.

Both decode with ``ssl_core.data.decode_images`` (RGB, bilinear resize + center crop to ``image_size``)
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
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

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


def read_manifest(path: Path | str) -> dict:
    """Load ``_manifest.json`` from an ingest output folder (or the file itself) and check its version."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no ingest manifest at {str(manifest_path)!r} (run `sslflow ingest` first)")
    manifest = json.loads(manifest_path.read_text())
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


def split_files(dataset_dir: Path | str, splits: str | list[str]) -> list[Path]:
    """The shard files holding ``splits``, from the manifest; unknown or empty splits raise ``ValueError``."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    names = _split_names(splits)
    for name in names:
        if name not in manifest["splits"]:
            raise ValueError(f"unknown split {name!r} in {dataset_dir}; known: {', '.join(manifest['splits'])}")
        if manifest["splits"][name]["rows"] == 0:
            raise ValueError(f"split {name!r} of {dataset_dir} has no rows")
    return [dataset_dir / shard["file"] for shard in manifest["shards"] if shard["split"] in names]


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
    keep the requested rows, decode."""
    for path, first_row in zip(shards["path"], shards["first_row"], strict=True):
        position = int(first_row)
        for record_batch in pq.ParquetFile(str(path)).iter_batches(batch_size=batch_size, columns=_COLUMNS):
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


def _first_rows(dataset_dir: Path | str, files: list[Path]) -> list[int]:
    """The ``row_index`` of the first row of each of ``files`` (shards in manifest order): rows of the shards before."""
    rows = {shard["file"]: int(shard["rows"]) for shard in read_manifest(dataset_dir)["shards"]}
    firsts, total = [], 0
    for path in files:
        firsts.append(total)
        total += rows[path.name]
    return firsts


def read_split(
    dataset_dir: Path | str,
    splits: str | list[str],
    *,
    image_size: int,
    labeled_only: bool = False,
    batch_size: int = 256,
    labeled_ids: Collection[str] | None = None,
):
    """A Ray Dataset of ``splits`` with columns ``image`` uint8 (3, S, S) per row, ``label`` int64 (-1 =
    unlabeled) and ``row_index`` int64 (the row's position in the requested splits, see the module docstring).

    Only the shards of the requested splits are opened (the manifest lists them; ingest writes one split per
    shard). ``labeled_ids`` (e.g. from ``labeled_subset_ids``) hides every label whose row id is not in it,
    before ``labeled_only`` drops unlabeled rows, so ``labeled_only=True, labeled_ids=ids`` yields exactly the
    rows of ``ids``.

    One ``map_batches`` task per shard streams it in ``batch_size``-row record batches and decodes them; every
    task requests ``READ_CPUS``. The shard list comes from the manifest rather than ``ray.data.read_parquet``
    because the latter also runs listing / schema-sampling tasks that need a whole CPU (not configurable in
    Ray 2.60), which never start while Train workers hold all but a fraction of a CPU.
    """
    import ray.data

    names = _split_names(splits)
    files = split_files(dataset_dir, names)
    shards = ray.data.from_items([{"path": str(path), "first_row": first_row}
                                  for path, first_row in zip(files, _first_rows(dataset_dir, files), strict=True)])
    return shards.map_batches(
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
    table = pq.read_table([str(path) for path in files], columns=_COLUMNS)
    if labeled_ids is not None:
        table = hide_labels(table, labeled_ids)
    mask = pc.is_in(table.column("split"), value_set=pa.array(names))
    if labeled_only:
        mask = pc.and_(mask, pc.is_valid(table.column("label")))
    decoded = decode_table(table.filter(mask), image_size)
    return torch.from_numpy(decoded["image"]), torch.from_numpy(decoded["label"])


def labeled_subset_ids(dataset_dir: Path | str, split: str, fraction: float, seed: int) -> list[str]:
    """Ids of the seeded, class-stratified subset of the labeled rows of ``split`` (sorted).

    ``stratified_subset`` of the ids with ``leave_one_out=False``: per class of ``n`` labeled rows,
    ``floor(fraction * n + 0.5)`` ids, at least 1 and at most ``n``; for one seed a smaller fraction's subset is
    contained in a larger one's. Reads only the ``id``, ``label`` and ``split`` columns.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    files = split_files(dataset_dir, split)
    table = pq.read_table([str(path) for path in files], columns=["id", "label", "split"])
    table = table.filter(pc.and_(pc.equal(table.column("split"), split), pc.is_valid(table.column("label"))))
    if table.num_rows == 0:
        raise ValueError(f"split {split!r} of {dataset_dir} has no labeled rows")
    ids = table.column("id").to_pylist()
    labels = table.column("label").to_pylist()
    return stratified_subset(ids, labels, fraction, seed=seed, stream=_SUBSET_STREAM, leave_one_out=False)
