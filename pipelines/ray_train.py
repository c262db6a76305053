"""Building and running a ``TorchTrainer`` from the pipeline's scaling section (the driver side of Ray Train)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.config import ScalingSection
from pipelines.environment import environment_variable
from pipelines.host_memory import worker_runtime_env


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
    ``callbacks`` are Ray Train ``UserCallback``s (e.g. Tune's ``TuneReportCallback`` inside a trial).

    Workers the cluster cannot place within ``scaling.resource_wait_s`` (more CPUs/GPUs than it has, an autoscaler
    that adds no node) raise ``ResourcesUnavailable`` naming the keys and the cluster's CPUs, instead of Ray Train
    waiting forever: the worker-group start timeout is that wait, and a start that times out is not retried
    (``controller_failure_limit=0``). CPU workers start with ``pipelines.host_memory.RETAIN_ENV`` when
    ``scaling.retain_freed_memory``."""
    trainer = TorchTrainer(
        train_func,
        train_loop_config=config,
        scaling_config=scaling_config(scaling),
        run_config=RunConfig(
            name=run_name,
            storage_path=scaling.storage_path,
            failure_config=FailureConfig(max_failures=scaling.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            worker_runtime_env=worker_runtime_env(scaling.retain_freed_memory, scaling.use_gpu),
        ),
        datasets=datasets,
    )
    try:
        with environment_variable(WORKER_GROUP_START_TIMEOUT_ENV, f"{scaling.resource_wait_s:g}"):
            result = trainer.fit()  # Ray Train hands the variable to its controller (its ENV_VARS_TO_PROPAGATE)
    except Exception as error:
        _raise_if_unplaced(error, scaling)
        raise
    if result.error is not None:
        _raise_if_unplaced(result.error, scaling)
        raise result.error
    return result


def _raise_if_unplaced(error: Exception, scaling: ScalingSection) -> None:
    """``ResourcesUnavailable`` from ``error`` when it is Ray Train's worker-group start timeout."""
    failure = getattr(error, "controller_failure", None)
    if type(failure).__name__ == "WorkerGroupStartupTimeoutError":  # ray.train.v2._internal: not public
        raise ResourcesUnavailable(unplaceable_message(scaling)) from error


WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class ResourcesUnavailable(ValueError):
    """The cluster did not give a worker group its CPUs/GPUs within ``scaling.resource_wait_s`` (a user error: the
    config asks for more than the cluster has or grows to)."""


def unplaceable_message(scaling: ScalingSection) -> str:
    """What was asked (the keys) and what the cluster has, for ``ResourcesUnavailable``."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    gpus = f" + scaling.gpus_per_worker={scaling.gpus_per_worker:g}" if scaling.use_gpu else ""
    return (f"scaling.num_workers={scaling.num_workers} x scaling.cpus_per_worker={scaling.cpus_per_worker:g}{gpus}: "
            f"Ray could not place the workers within scaling.resource_wait_s={scaling.resource_wait_s:g} s; the "
            f"cluster has {total.get('CPU', 0):g} CPUs ({free.get('CPU', 0):g} free) and {total.get('GPU', 0):g} GPUs")
