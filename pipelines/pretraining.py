"""Pretraining on Ray Train workers (DDP): any ``ssl_core`` method, data from Parquet through Ray Data. Used by the
pretrain stage and by every Tune trial.

``fit_pretraining`` is the driver: it builds the ``TorchTrainer`` over every image of the train split (never val or
test, ``pipelines.knn_monitor.pretrain_splits``) and returns Ray's result; ``train_func`` is the Ray boundary (one
call per worker): the method's ``ssl_objective`` in the worker loop (``pipelines.train_loop``), the kNN monitor on
rank 0 (``pipelines.knn_monitor``: which labeled rows it uses, or why it is off, printed once and tagged on the run),
and on rank 0 at the end the encoder logged as an MLflow PyTorch model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import ray
import torch

from pipelines import faults, tracking
from pipelines.config import PipelineConfig, from_dict
from pipelines.datasets import IF_FITS, read_manifest, read_split
from pipelines.faults import Faults
from pipelines.knn_monitor import KNN_MONITOR_TAG, KnnMonitor, monitor_plan, pretrain_rows, pretrain_splits
from pipelines.ray_train import fit
from pipelines.train_loop import LoopSpec, train, worker_info
from ssl_core.methods import build_method
from ssl_core.optim import scaled_lr
from ssl_core.training import batch_plan, ssl_objective


@dataclass(frozen=True)
class PretrainJob:
    """What a pretraining worker needs; crosses the Ray boundary as ``dataclasses.asdict`` and is rebuilt once."""

    config: PipelineConfig
    run_id: str | None
    run_name: str
    train_rows: int
    log_model: bool = True
    faults: Faults = Faults()
    """The test faults of the driver's ``SSLFLOW_FAULTS`` (``pipelines.faults``): workers do not read their own
    environment, which a Ray started before the variable was set does not carry."""
    resume_from: str | None = None
    """An earlier attempt's checkpoint folder to start from (``pipelines.resume``)."""


def train_func(values: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker. Returns (on rank 0) ``{"metrics", "encoder_uri"}``."""
    job = from_dict(PretrainJob, values)
    cfg, p = job.config, job.config.pretrain
    info = worker_info(cfg.scaling.cpus_per_worker, cfg.scaling.torch_threads, "pretrain")
    if job.run_id is not None:  # every rank records its Ray node: placement across nodes shows in the run's tags
        tracking.set_tags(cfg.tracking, job.run_id, {tracking.node_tag(info.rank): ray.get_runtime_context().get_node_id()})
    method = build_method(cfg.method.name, cfg.method.config, train_rows=job.train_rows)
    plan = batch_plan(job.train_rows, p.batch_size, info.world_size, "pretrain.batch_size", shrink=False)
    global_batch = plan.per_worker_batch * info.world_size
    lr = scaled_lr(p.lr, global_batch, p.lr_scaling)
    spec = LoopSpec(
        stage="pretrain", what=f"method {cfg.method.name}", epochs=p.epochs, rows=job.train_rows, batch=plan,
        seed=p.seed, optimizer=p.optimizer, lr=lr, weight_decay=p.weight_decay,
        warmup_steps=round(p.warmup_epochs * plan.steps_per_epoch), final_lr=lr * p.final_lr_fraction,
        grad_clip=p.grad_clip, checkpoint_every=p.checkpoint_every, check_every_steps=p.log_every_steps,
        compile=p.compile, nan_at_step=job.faults.pretrain_nan_at_step,
        budget_seconds=None if p.budget_minutes is None else 60 * p.budget_minutes, precision=p.precision,
        storage_path=cfg.scaling.storage_path,
    )
    monitor = None
    if info.is_chief:
        monitor_choice = monitor_plan(read_manifest(cfg.data.path))
        print(f"[pretrain] {monitor_choice.description}", flush=True)
        if job.run_id is not None:
            tracking.set_tags(cfg.tracking, job.run_id, {KNN_MONITOR_TAG: monitor_choice.description})
        if monitor_choice.mode != "off":
            monitor = KnnMonitor(cfg.data.path, monitor_choice, cfg.data.image_size,
                                 normalization=method.normalization(), device=info.device, k=p.knn_k,
                                 temperature=p.knn_temperature, bank_size=p.knn_bank_size, seed=p.seed)

    def knn(epoch: int, final: bool) -> dict[str, float]:
        due = monitor is not None and (epoch % p.knn_every == 0 or final)
        return {"knn_top1": monitor(method.encoder)} if due else {}

    def after_step(step: int, total_steps: int) -> None:
        method.on_after_optimizer_step(step, total_steps)
        faults.hold_at_step(job.faults, job.run_name, step, info.rank)  # a test parks the run here (SSLFLOW_FAULTS)

    method, metrics = train(
        method, ssl_objective(method.view_generator(), info.device), spec, info, tracking_config=cfg.tracking,
        run_id=job.run_id, param_groups=method.param_groups(p.weight_decay), after_step=after_step,
        epoch_metrics=knn, resume_from=job.resume_from,
        before_epoch=lambda epoch: faults.hold_at_epoch(job.faults, job.run_name, epoch, info.rank),
    )
    if not info.is_chief:
        return None
    encoder_uri = None
    if job.run_id is not None and job.log_model:
        example = torch.zeros(2, 3, cfg.data.image_size, cfg.data.image_size)
        encoder_uri = tracking.log_torch_model(cfg.tracking, job.run_id, method.encoder, "encoder", example)
    return {"metrics": metrics, "encoder_uri": encoder_uri}


def check_pretrain_batch(cfg: PipelineConfig, manifest: dict) -> None:
    """``ValueError`` naming ``pretrain.batch_size`` unless the rows pretraining reads fill one batch per worker."""
    batch_plan(pretrain_rows(manifest), cfg.pretrain.batch_size, max(1, cfg.scaling.num_workers),
               "pretrain.batch_size", shrink=False)


def fit_pretraining(cfg: PipelineConfig, run_id: str | None, run_name: str, *, callbacks: list[Any] | None = None,
                    log_model: bool = True, resume_from: str | None = None):
    """Driver: pretrain ``cfg``'s method on every image of its train split (``pretrain_splits``) as the Ray
    Train run ``run_name``; returns Ray's ``Result`` (``return_value`` = rank 0's ``{"metrics", "encoder_uri"}``).
    ``log_model=False`` (Tune trials) skips logging the encoder; ``callbacks`` are Ray Train callbacks (Tune's report
    callback); ``resume_from`` an earlier attempt's checkpoint folder to start from. A batch that the rows cannot
    fill raises ``ValueError`` here, before any worker starts."""
    manifest = read_manifest(cfg.data.path)
    check_pretrain_batch(cfg, manifest)
    rows = pretrain_rows(manifest)
    job = PretrainJob(cfg, run_id, run_name, rows, log_model, faults.active(), resume_from)
    dataset = read_split(cfg.data.path, pretrain_splits(manifest), image_size=cfg.data.image_size,
                         materialize=IF_FITS)  # decoded once when it fits, not per epoch
    return fit(train_func, dataclasses.asdict(job), cfg.scaling, run_name, {"train": dataset}, callbacks)
