"""Building and running a ``TorchTrainer`` from the pipeline's scaling section (the driver side of Ray Train)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.config import ScalingSection


def train_run_name(stage: str, run_id: str) -> str:
    """The Ray Train run name of a stage's MLflow run: its checkpoints live under ``storage_path/<name>``."""
    return f"{stage}-{run_id}"


def scaling_config(scaling: ScalingSection) -> ScalingConfig:
    resources: dict[str, float] = {**scaling.resources_per_worker, "CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources)


def fit(
    train_func: Callable[[dict[str, Any]], Any],
    config: dict[str, Any],
    scaling: ScalingSection,
    run_name: str,
    datasets: dict[str, Any],
    callbacks: list[Any] | None = None,
):
    """Run ``train_func`` on ``scaling.num_workers`` workers; a failed run raises with the workers' error.
    ``callbacks`` are Ray Train ``UserCallback``s (e.g. Tune's ``TuneReportCallback`` inside a trial)."""
    trainer = TorchTrainer(
        train_func,
        train_loop_config=config,
        scaling_config=scaling_config(scaling),
        run_config=RunConfig(
            name=run_name,
            storage_path=scaling.storage_path,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result
