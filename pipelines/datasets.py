"""Reading an ingest output (Parquet shards + ``_manifest.json``) for training and evaluation.

Two readers, for two jobs:

- ``read_split`` returns a lazy, streaming ``ray.data.Dataset``. It is what training uses: Ray Data reads
  the shards in parallel tasks, decodes in batches, and ``Dataset.streaming_split`` / Ray Train's dataset
  shards feed each DDP worker its part without any worker holding the whole split. It needs a running
  Ray and pays a task-scheduling start-up cost.
- ``load_split_tensors`` reads a split with pyarrow in the calling process and returns two tensors. It
  is for small evaluation sets that are used whole and repeatedly (the kNN monitor's bank, the test
  split for linear probes), where a streaming pipeline would only add latency and a Ray dependency.

Both decode with ``ssl_core.data.decode_images`` (RGB, bilinear resize + center crop to ``image_size``)
and give images as uint8 (N, 3, S, S) and labels as int64 with -1 for unlabeled. An image that cannot be
decoded (ingest verified every image, so this means damage after ingest) is dropped and counted in a
warning, never raised mid-epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipelines.stages.ingest import read_manifest
from ssl_core.data import decode_images

logger = logging.getLogger(__name__)

UNLABELED = -1
"""Label value given to rows whose Parquet label is null."""


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
    """Decode a table of contract rows into ``{"image": uint8 (N, 3, S, S), "label": int64 (N,)}``.

    Rows whose image cannot be decoded are dropped and logged with their ids.
    """
    images, failed = decode_images(table.column("image").to_pylist(), image_size)
    labels = table.column("label").fill_null(UNLABELED).to_numpy(zero_copy_only=False).astype(np.int64)
    if failed:
        ids = table.column("id").take(pa.array(failed)).to_pylist()
        logger.warning("dropped %d undecodable images: %s", len(failed), ", ".join(ids[:10]))
        labels = np.delete(labels, failed)
    return {"image": images.numpy(), "label": labels}


def read_split(
    dataset_dir: Path | str,
    splits: str | list[str],
    *,
    image_size: int,
    labeled_only: bool = False,
    batch_size: int = 256,
):
    """A Ray Dataset of ``splits`` with columns ``image`` uint8 (3, S, S) per row and ``label`` int64 (-1 =
    unlabeled).

    Only the shards of the requested splits are opened (ingest writes one split per shard) and the
    ``split``/``label`` predicate is pushed down to the Parquet scan. ``labeled_only`` drops unlabeled rows.
    Decoding runs in ``map_batches`` tasks over ``batch_size`` rows.
    """
    import ray.data
    from ray.data.expressions import col

    names = _split_names(splits)
    files = split_files(dataset_dir, names)
    predicate = col("split").is_in(names)
    if labeled_only:
        predicate = predicate & col("label").is_not_null()
    dataset = ray.data.read_parquet([str(path) for path in files])
    return dataset.filter(expr=predicate).map_batches(
        decode_table, fn_kwargs={"image_size": image_size}, batch_format="pyarrow", batch_size=batch_size
    )


def load_split_tensors(
    dataset_dir: Path | str,
    splits: str | list[str],
    image_size: int,
    labeled_only: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``splits`` whole, without Ray: ``(images uint8 (N, 3, S, S), labels int64 (N,))``, -1 = unlabeled.

    Rows come in shard order (the seeded order ingest wrote), so repeated calls give the same tensors.
    """
    names = _split_names(splits)
    files = split_files(dataset_dir, names)
    table = pq.read_table([str(path) for path in files], columns=["id", "image", "label", "split"])
    mask = pc.is_in(table.column("split"), value_set=pa.array(names))
    if labeled_only:
        mask = pc.and_(mask, pc.is_valid(table.column("label")))
    decoded = decode_table(table.filter(mask), image_size)
    return torch.from_numpy(decoded["image"]), torch.from_numpy(decoded["label"])
