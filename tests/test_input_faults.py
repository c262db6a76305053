"""Faults in what a user gives: a source that changed after it was ingested, ``--force ingest``, a tracking server
that does not answer, a dry run / ``promote`` / ``ls`` in an empty folder (they write nothing), ``promote`` of a model
or version that does not exist, workers the machine cannot hold (all without Ray), and workers a cluster cannot place
(the test session's Ray). Real files, real MLflow (SQLite), the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines import tracking
from pipelines.cli import main
from pipelines.config import QUICKSTART, load_config
from pipelines.dag import execute_stage, plan
from pipelines.datasets import read_manifest

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def write_images(folder: Path, start: int, count: int, seed: int = 0) -> None:
    """``count`` random 8x8 BMPs (a fixed file size for a fixed image size) in two class folders."""
    rng = np.random.default_rng(seed)
    for index in range(start, start + count):
        (folder / f"c{index % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"c{index % 2}" / f"{index:03d}.bmp")


def pipeline_yaml(tmp_path: Path, **sections: dict) -> Path:
    """The quickstart YAML, tracked in ``tmp_path``, with ``sections`` merged in."""
    values = yaml.safe_load(QUICKSTART.read_text())
    values["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "mlartifacts")}
    for name, overrides in sections.items():
        values[name] = {**values.get(name, {}), **overrides}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_changed_source_is_ingested_again_and_force_rewrites(tmp_path: Path, capsys) -> None:
    folder, data = tmp_path / "images", tmp_path / "data"
    write_images(folder, 0, 12)
    config = pipeline_yaml(tmp_path, data={"source": str(folder), "path": str(data), "image_size": 8},
                           pretrain={"batch_size": 2})
    cfg = load_config(config)
    parent = tracking.start_run(cfg.tracking, "faults/pipeline")

    def ingest_stage(force: bool = False):
        """The ingest stage as the pipeline runs it (``execute_stage``, here in-process), with its plan's
        fingerprint."""
        return execute_stage("ingest", cfg.to_dict(), plan(cfg, None, until="ingest")[0].fingerprint, parent,
                             force=force)

    def dry_run(*force: str) -> dict[str, str]:
        assert main(["run", str(config), "--dry-run", *[f"--force={stage}" for stage in force]]) == 0
        lines = [line.split(None, 2) for line in capsys.readouterr().out.splitlines()[1:]]
        return {name: reason for name, _, reason in lines}

    first = ingest_stage()
    assert read_manifest(data)["num_rows"] == 12
    assert dry_run()["ingest"] == f"reuse run {first.run_id}"

    write_images(folder, 12, 6, seed=1)  # 6 more images: the folder's signature changes
    reasons = dry_run()
    assert reasons["ingest"] == f"run: the source {folder} changed since it was ingested to {data}"
    assert reasons["pretrain"] == "run: its inputs are produced in this run"  # through the dataset hash
    second = ingest_stage()
    assert read_manifest(data)["num_rows"] == 18 and second.content_hash != first.content_hash
    assert dry_run()["ingest"] == f"reuse run {second.run_id}"

    # A change the signature cannot see (same size, mtime put back): reused, unless --force ingest rewrites it.
    image = folder / "c0" / "000.bmp"
    stat = image.stat()
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size
    assert ingest_stage().content_hash == second.content_hash  # the dataset on disk is kept as it is
    assert dry_run("ingest")["ingest"] == "run: forced"
    forced = ingest_stage(force=True)
    assert read_manifest(data)["num_rows"] == 18 and forced.content_hash not in (first.content_hash,
                                                                                 second.content_hash)


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_an_unreachable_tracking_server_fails_fast_with_its_uri_and_starts_nothing(tmp_path: Path, capsys,
                                                                                    monkeypatch) -> None:
    result = run_cli(tmp_path, "run", env={"MLFLOW_TRACKING_URI": UNREACHABLE})
    assert result.returncode == 2, result.stderr
    assert f"the MLflow tracking server {UNREACHABLE} does not answer" in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stdout + result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no mlflow.db, no data, no Ray log
    # In-process (the same code, less start-up): a dry run, ls and promote, by env or by tracking.uri.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    for argv in (["run", "--dry-run"], ["ls"], ["promote", "sslflow-quickstart", "1"]):
        assert main(argv) == 2
        assert UNREACHABLE in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["run", str(pipeline_yaml(tmp_path, tracking={"uri": UNREACHABLE})), "--dry-run"]) == 2
    assert UNREACHABLE in capsys.readouterr().err


def test_dry_run_promote_and_ls_in_an_empty_folder_write_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["run", "--dry-run"]) == 0
    assert "ingest    " in capsys.readouterr().out
    assert main(["ls"]) == 0
    assert main(["promote", "sslflow-quickstart", "1"]) == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert error == (f"sslflow: error: no registered model 'sslflow-quickstart': the tracking store "
                     f"sqlite:///{tmp_path / 'mlflow.db'} does not exist yet")
    assert list(tmp_path.iterdir()) == []


def test_promote_of_an_unknown_model_or_version_names_it(tmp_path: Path, capsys) -> None:
    config = pipeline_yaml(tmp_path)
    cfg = load_config(config)
    tracking.ensure_experiment(cfg.tracking)
    client = MlflowClient(cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    client.create_registered_model("known")
    client.create_model_version("known", "runs:/0123456789abcdef/model")
    cases = {
        ("unknown", "1"): f"no registered model 'unknown' in {cfg.tracking.uri}",
        ("known", "7"): "registered model 'known' has no version 7 (its versions: 1)",
        ("known", "latest"): "model version 'latest' is not a version number (1, 2, ...)",
    }
    for (model, version), message in cases.items():
        assert main(["promote", model, version, "--config", str(config)]) == 2
        error = capsys.readouterr().err
        ours = [line for line in error.splitlines() if line.startswith("sslflow:")]  # MLflow logs its own lines
        assert ours[0] == f"sslflow: error: {message}" and "Traceback" not in error
    assert [model.name for model in client.search_registered_models()] == ["known"]  # nothing created


def test_workers_this_machine_cannot_hold_are_refused_before_ray_starts(tmp_path: Path, capsys, monkeypatch) -> None:
    """The embedded local Ray (no RAY_ADDRESS) would wait forever for CPUs this machine does not have."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    config = pipeline_yaml(tmp_path, scaling={"num_workers": cpus + 1, "cpus_per_worker": 1.0})
    for argv in (["run", str(config), "--dry-run"], ["run", str(config)]):
        assert main(argv) == 2
        assert (f"scaling.num_workers={cpus + 1} x scaling.cpus_per_worker=1 needs {cpus + 1} CPUs, and this "
                f"machine's Ray has {cpus}") in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [config]  # no mlflow.db, no Ray session log


def _never_called(config: dict) -> None:
    raise AssertionError("no worker may start: the cluster cannot place the group")


def test_workers_the_cluster_cannot_place_fail_after_the_bounded_wait(ray_session, tmp_path: Path) -> None:
    """On a cluster (here the test session's 2-CPU Ray) Ray Train would wait for 4 one-CPU workers forever: the stage
    fails after ``scaling.resource_wait_s``, naming the keys and the cluster's CPUs."""
    from pipelines.config import ScalingSection
    from pipelines.ray_train import ResourcesUnavailable, fit

    scaling = ScalingSection(num_workers=4, cpus_per_worker=1.0, resource_wait_s=5.0, storage_path=str(tmp_path))
    with pytest.raises(ResourcesUnavailable) as raised:
        fit(_never_called, {}, scaling, "unplaceable", {})
    assert str(raised.value).startswith("scaling.num_workers=4 x scaling.cpus_per_worker=1: Ray could not place the "
                                        "workers within scaling.resource_wait_s=5 s; the cluster has 2 CPUs (")
