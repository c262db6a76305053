"""Ingest outputs on object storage: URIs are parsed (never taken as folder names), ingest writes to a real local
S3 server (moto, ``s3_server`` in conftest) with the manifest as its commit point, and the readers give the same
rows as from a local disk. No Ray here (see test_storage_ray.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from pipelines import storage
from pipelines.cli import main
from pipelines.datasets import MANIFEST_NAME, has_manifest, labeled_subset_ids, load_split_tensors, read_manifest
from pipelines.stages import ingest as ingest_module
from pipelines.stages.ingest import ingest


def objects(uri: str) -> list[str]:
    return storage.list_names(storage.locate(uri))


@pytest.mark.parametrize("where", ["s3:/bucket/digits", "s3:bucket", "s3:///digits", "ftp://host/digits",
                                   "hdfs://namenode/digits", "file:relative"])
def test_a_uri_that_cannot_be_handled_is_refused_not_taken_as_a_path(where: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture):
    with pytest.raises(ValueError, match=f"{where}"):
        storage.locate(where)
    monkeypatch.chdir(tmp_path)
    assert main(["ingest", "builtin:digits", where]) != 0
    assert repr(where) in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" (or anything else) was written


def test_local_paths_and_file_uris_are_local(tmp_path: Path):
    for where in (tmp_path / "a", str(tmp_path / "a"), f"file://{tmp_path}/a"):
        location = storage.locate(where)
        assert not location.is_remote and isinstance(location.filesystem, pafs.LocalFileSystem)
        assert location.path == str(tmp_path / "a") and location.child("b/c").path == str(tmp_path / "a/b/c")


def test_ingest_to_s3_matches_a_local_ingest(s3_server, tmp_path: Path):
    bucket = s3_server.bucket("sslflow-ingest")
    local = ingest("builtin:digits", tmp_path / "digits", seed=3)
    remote = ingest("builtin:digits", f"{bucket}/data/digits", seed=3)
    assert remote["content_hash"] == local["content_hash"]
    assert {key: value for key, value in remote.items() if key != "shards"} == \
        {key: value for key, value in local.items() if key != "shards"}
    assert read_manifest(f"{bucket}/data/digits") == remote and has_manifest(f"{bucket}/data/digits")
    names = objects(f"{bucket}/data/digits")
    assert set(names) == {MANIFEST_NAME} | {shard["file"] for shard in remote["shards"]}
    for split in ("train", "test"):
        remote_images, remote_labels = load_split_tensors(f"{bucket}/data/digits", split, 8, labeled_only=False)
        local_images, local_labels = load_split_tensors(tmp_path / "digits", split, 8, labeled_only=False)
        assert torch.equal(remote_images, local_images) and torch.equal(remote_labels, local_labels)
    assert labeled_subset_ids(f"{bucket}/data/digits", "train", 0.1, 0) == \
        labeled_subset_ids(tmp_path / "digits", "train", 0.1, 0)


def test_interrupted_ingest_to_s3_leaves_no_manifest_and_no_shards(s3_server, monkeypatch: pytest.MonkeyPatch):
    bucket = s3_server.bucket("sslflow-interrupt")
    calls = []
    real_write_shard = ingest_module.write_shard

    def failing_write_shard(*args, **kwargs):
        real_write_shard(*args, **kwargs)
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(ingest_module, "write_shard", failing_write_shard)
    with pytest.raises(KeyboardInterrupt):
        ingest("builtin:digits", f"{bucket}/digits", shard_rows=300)
    assert len(calls) == 2  # shards were written before the interruption ...
    assert objects(f"{bucket}/digits") == []  # ... and removed; no manifest was ever written
    with pytest.raises(FileNotFoundError, match=f"{bucket}/digits"):
        read_manifest(f"{bucket}/digits")


def test_shards_without_a_manifest_are_never_read(s3_server, tmp_path: Path):
    """A crash that kills the process (no cleanup) leaves shards under a prefix but no manifest: unreadable."""
    bucket = s3_server.bucket("sslflow-orphans")
    ingest("builtin:digits", f"{bucket}/digits")
    location = storage.locate(f"{bucket}/digits")
    location.filesystem.delete_file(location.child(MANIFEST_NAME).path)
    assert objects(f"{bucket}/digits")  # the shards are still there
    assert not has_manifest(f"{bucket}/digits")
    with pytest.raises(FileNotFoundError, match="never read"):
        load_split_tensors(f"{bucket}/digits", "train", 8)
    with pytest.raises(FileExistsError, match="not an ingest output"):
        ingest("builtin:digits", f"{bucket}/digits", overwrite=True)


def test_overwrite_on_s3_replaces_the_dataset_and_deletes_the_old_shards(s3_server):
    bucket = s3_server.bucket("sslflow-overwrite")
    first = ingest("builtin:digits", f"{bucket}/digits", seed=0)
    with pytest.raises(FileExistsError, match=f"{bucket}/digits"):
        ingest("builtin:digits", f"{bucket}/digits", seed=1)
    second = ingest("builtin:digits", f"{bucket}/digits", seed=1, overwrite=True)
    assert second["content_hash"] != first["content_hash"]
    assert read_manifest(f"{bucket}/digits") == second
    assert sorted(objects(f"{bucket}/digits")) == sorted([MANIFEST_NAME] + [s["file"] for s in second["shards"]])


def test_unreadable_bucket_fails_before_any_work_naming_the_uri(s3_server, monkeypatch: pytest.MonkeyPatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the source was opened before the output was checked")

    monkeypatch.setattr(ingest_module, "open_source", no_work)
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket/digits"):
        ingest("builtin:digits", "s3://no-such-bucket/digits")
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket/digits"):
        read_manifest("s3://no-such-bucket/digits")


def test_wrong_credentials_fail_naming_the_uri(s3_server, monkeypatch: pytest.MonkeyPatch):
    """moto checks nothing about keys, so a store that refuses them is played by an endpoint nobody listens on."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(storage.StorageError, match="s3://sslflow-ingest/digits"):
        ingest("builtin:digits", "s3://sslflow-ingest/digits")
    assert os.environ["AWS_ENDPOINT_URL"].endswith(":9")


def test_cli_ingest_to_s3(s3_server, capsys: pytest.CaptureFixture):
    bucket = s3_server.bucket("sslflow-cli")
    assert main(["ingest", "builtin:digits", f"{bucket}/digits", "--shard-rows", "500"]) == 0
    assert f"-> {bucket}/digits" in capsys.readouterr().out
    manifest = read_manifest(f"{bucket}/digits")
    assert manifest["num_rows"] == 1797 and all(shard["rows"] <= 500 for shard in manifest["shards"])


def test_config_refuses_a_data_path_uri_it_cannot_handle(tmp_path: Path):
    from conftest import shrunk_quickstart

    from pipelines.config import config_from_mapping

    for bad in ("s3:/bucket/digits", "ftp://host/digits"):
        with pytest.raises(ValueError, match=f"data.path={bad!r}"):
            config_from_mapping(shrunk_quickstart(tmp_path, bad))
    assert config_from_mapping(shrunk_quickstart(tmp_path, "s3://bucket/digits")).data.path == "s3://bucket/digits"
