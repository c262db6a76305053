"""Pretraining on real Ray Train (2 CPU workers) tracked in real MLflow: metrics, model, NaN guard (resuming after a
killed worker or driver: tests/test_resume.py)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.config import config_from_mapping
from pipelines.faults import FAULTS_ENV
from pipelines.records import PretrainRecord
from pipelines.datasets import read_manifest
from pipelines.stages import pretrain
from pipelines.stages.ingest import ingest

pytestmark = pytest.mark.slow

TINY_METHODS = {
    "simclr": {"backbone": "resnet8", "projection_hidden_dim": 32, "projection_dim": 16},
    "moco": {"backbone": "resnet8", "projection_hidden_dim": 32, "projection_dim": 16, "queue_size": 256},
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits"
    ingest("builtin:digits", path)
    return path


def _config(tmp_path: Path, digits: Path, method: str, **pretrain):
    return config_from_mapping(
        {
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "artifacts")},
            "data": {"path": str(digits), "image_size": 16},
            "method": {"name": method, "config": TINY_METHODS[method]},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "storage_path": str(tmp_path / "runs")},
            "pretrain": {"epochs": 2, "batch_size": 64, "optimizer": "adamw", "lr": 2e-3, "warmup_epochs": 0.5,
                         "log_every_steps": 5, **pretrain},
            "finetune": {"head_layers": 0},  # not fine-tuned here
        },
        base=tmp_path,
    )


def _pretrain(cfg, name: str = "pretrain") -> tuple[str, PretrainRecord]:
    with tracking.run(cfg.tracking, name, {tracking.STAGE_TAG: "pretrain"}, params=cfg.to_dict()) as run_id:
        return run_id, pretrain.run(cfg, run_id, {})


def _train_rows(digits: Path) -> int:
    """Rows pretraining trains on: every image of train, none of val (``pipelines.knn_monitor.pretrain_rows``)."""
    return read_manifest(digits)["splits"]["train"]["rows"]


def _history(cfg, run_id: str, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(cfg.tracking.uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_two_worker_pretraining_is_tracked_and_the_encoder_loads_back(ray_session, tmp_path: Path,
                                                                     digits: Path) -> None:
    """MoCo (a queue and an EMA key encoder across 2 DDP workers); rotation's per-step logs and a 2-worker stop
    together: tests/test_budget.py."""
    method = "moco"
    cfg = _config(tmp_path, digits, method)
    run_id, record = _pretrain(cfg)
    run = MlflowClient(cfg.tracking.uri).get_run(run_id)
    assert run.data.params["method.name"] == method
    assert run.data.params["scaling.num_workers"] == "2"
    steps = 2 * (_train_rows(digits) // 128)
    losses = _history(cfg, run_id, "train_loss")
    assert [s for s, _ in losses] == list(range(steps))
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    knn = _history(cfg, run_id, "epoch_knn_top1")
    assert [s for s, _ in knn] == [1, 2] and all(0.1 < v <= 1.0 for _, v in knn)
    assert [s for s, _ in _history(cfg, run_id, "epoch_images_per_second")] == [1, 2]
    assert record.checkpoint_uri.endswith("checkpoints/checkpoint.pt")

    mlflow.set_tracking_uri(cfg.tracking.uri)
    encoder = mlflow.pytorch.load_model(record.encoder_uri)
    features = encoder(torch.rand(4, 3, 16, 16))
    assert features.shape == (4, 64) and torch.isfinite(features).all()


def test_nan_loss_stops_the_run_naming_step_and_method(ray_session, tmp_path: Path, digits: Path,
                                                       monkeypatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, '{"pretrain_nan_at_step": 3}')  # read by the driver, handed to the workers
    cfg = _config(tmp_path, digits, "simclr")
    cfg = cfg.with_overlay({"scaling": {"max_failures": 0}})
    with pytest.raises(Exception, match=r"non-finite loss at step 3 \(method simclr\); last finite loss: \d"):
        _pretrain(cfg)
    failed = MlflowClient(cfg.tracking.uri).search_runs(
        [MlflowClient(cfg.tracking.uri).get_experiment_by_name("sslflow").experiment_id])[0]
    assert failed.info.status == "FAILED"
