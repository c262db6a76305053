"""The pipeline reads its data from object storage: ingest to a real local S3 server (moto, conftest's
``s3_server``), then ingest -> pretrain -> evaluate of the shrunk quickstart with 2 Ray Train workers whose Ray Data
readers stream the shards from S3, and Ray Train checkpoints on S3 too. Nothing of the data is on a local disk.
The readers' row-for-row equality with a local ingest is tested without Ray in test_storage.py.

Only the stages up to ``evaluate`` run (``run_pipeline(until="evaluate")``): fine-tune and distill read the data
through the same readers (``read_split`` / ``load_split_tensors``) and would add a minute of CPU time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import shrunk_quickstart

from pipelines import storage
from pipelines.config import config_from_mapping
from pipelines.dag import run_pipeline
from pipelines.datasets import read_manifest
from pipelines.stages.ingest import ingest

pytestmark = pytest.mark.slow


def test_pipeline_from_s3_with_two_workers(s3_server, ray_session, tmp_path: Path):
    bucket = s3_server.bucket("sslflow-pipeline")
    values = shrunk_quickstart(tmp_path, f"{bucket}/data/digits")
    values["scaling"].update(num_workers=2, storage_path=f"{bucket}/runs")
    cfg = config_from_mapping(values)
    assert cfg.data.path == f"{bucket}/data/digits" and cfg.scaling.storage_path == f"{bucket}/runs"
    result = run_pipeline(cfg, until="evaluate")

    local = ingest(cfg.data.source, tmp_path / "local", val_fraction=cfg.data.val_fraction, seed=cfg.data.seed)
    assert result.records["ingest"].content_hash == local["content_hash"]
    assert read_manifest(cfg.data.path)["content_hash"] == local["content_hash"]
    assert [path for path in tmp_path.rglob("*.parquet") if "local" not in path.parts] == []  # no data on disk
    assert storage.list_names(storage.locate(f"{bucket}/runs")), "Ray Train wrote nothing to the S3 storage path"
    evaluate = result.records["evaluate"].metrics
    assert evaluate["knn_top1_ssl"] > 0.2  # 10 classes: the encoder was trained on the images read from S3


def test_ray_ingest_to_s3_writes_what_threads_write_locally(s3_server, ray_session, tmp_path: Path):
    """``executor="ray"``: one Ray task per chunk of ``shard_rows`` files, each writing its shard to S3."""
    bucket = s3_server.bucket("sslflow-ray-ingest")
    threads = ingest("builtin:digits", tmp_path / "threads", shard_rows=300, workers=2)
    on_ray = ingest("builtin:digits", f"{bucket}/digits", shard_rows=300, executor="ray")
    assert len(threads["shards"]) == len(on_ray["shards"]) == 8  # train 1293 rows: 5 chunks, val 145: 1, test 359: 2
    for local_shard, ray_shard in zip(threads["shards"], on_ray["shards"], strict=True):
        prefix, name = ray_shard["file"].split("/")
        assert prefix.startswith("shards-") and {**ray_shard, "file": name} == local_shard
    assert {**on_ray, "shards": None} == {**threads, "shards": None}


def test_materialised_subset_is_read_once(ray_session, tmp_path: Path):
    """``read_split(materialize=IF_FITS)`` (the training stages' read) reads and decodes a subset that fits once:
    after that the data can be gone and every epoch still gets exactly the subset's rows (decoded as the streaming
    reader decodes them). Rows that would not fit (over 2 GiB decoded, the most it ever keeps) stream instead."""
    import shutil

    from ray.data.dataset import MaterializedDataset

    from pipelines.datasets import IF_FITS, labeled_subset_ids, read_split

    ingest("builtin:digits", tmp_path / "digits", seed=0)
    ids = labeled_subset_ids(tmp_path / "digits", "train", 0.05, 0)
    huge = read_split(tmp_path / "digits", "train", image_size=4096, labeled_only=True, labeled_ids=ids,
                      materialize=IF_FITS)  # len(ids) x 3 x 4096 x 4096 bytes > 2 GiB: lazy, nothing decoded
    assert len(ids) * 3 * 4096**2 > 2 * 2**30 and not isinstance(huge, MaterializedDataset)

    def rows(dataset) -> dict[int, tuple[int, bytes]]:
        return {int(r.row_index): (int(r.label), r.image.tobytes()) for r in dataset.to_pandas().itertuples()}

    streaming = rows(read_split(tmp_path / "digits", "train", image_size=8, labeled_only=True, labeled_ids=ids))
    subset = read_split(tmp_path / "digits", "train", image_size=8, labeled_only=True, labeled_ids=ids,
                        materialize=IF_FITS)
    assert isinstance(subset, MaterializedDataset)
    shutil.rmtree(tmp_path / "digits")
    assert rows(subset) == streaming == rows(subset)  # two epochs, no shard left to read
    assert len(streaming) == len(ids)
