"""Building and running a ``TorchTrainer`` from the pipeline's scaling section (the driver side of Ray Train)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.config import ScalingSection


WORKER_NICENESS_ENV = "RAY_worker_niceness"
WORKER_NICENESS = "0"
"""Ray starts its worker processes at nice 15 by default so that its own daemons stay responsive; training then loses
the CPU to anything else on the machine. A Ray that sslflow starts (the CLI, the benchmarks) runs its workers at
the driver's priority instead; set ``RAY_worker_niceness`` yourself to choose another value. A cluster that sslflow
joins (``RAY_ADDRESS``, ``ray job submit``) keeps the niceness its ``ray start`` was given."""


def init_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)`` with the workers' niceness at ``WORKER_NICENESS`` unless ``RAY_worker_niceness`` is set:
    the one way the CLI and the benchmarks start (or join) Ray. Does nothing if Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault(WORKER_NICENESS_ENV, WORKER_NICENESS)
    ray.init(**kwargs)


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
