"""Pretraining stage: any ``ssl_core`` method on Ray Train workers (DDP), data from Parquet through Ray Data.

``train_func(config)`` is the Ray boundary (one call per worker); ``run_pretrain`` is the driver that builds the
``TorchTrainer`` and returns a small record (run id, model and checkpoint URIs, final metrics).

Per epoch every worker streams its dataset shard, augments on its device (``ssl_core.augment``), steps the
method, and reports through ``ray.train.report``; rank 0 also runs the kNN monitor, attaches a checkpoint
every ``checkpoint_every`` epochs and writes metrics to MLflow. A restarted worker group (``FailureConfig``)
resumes from the latest checkpoint: epoch, optimizer step, schedules and method state continue.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines import tracking
from pipelines.config import PipelineConfig, PretrainSection, TrackingConfig
from pipelines.datasets import load_split_tensors, read_split
from pipelines.stages.ingest import read_manifest
from pipelines.train_loop import (
    NonFiniteGuard,
    build_optimizer,
    job_from_dict,
    load_checkpoint_state,
    report,
    scaled_lr,
    seed_epoch,
    set_lr,
    unwrap,
    worker_info,
)
from ssl_core import augment
from ssl_core.device import autocast, compile_or_eager, uses_channels_last, views_to_memory_format
from ssl_core.evaluate import extract_features, knn_accuracy
from ssl_core.methods import SSLMethod, build_method


@dataclass(frozen=True)
class PretrainJob:
    """Everything a pretraining worker needs; crosses the Ray boundary as a plain dict."""

    method_name: str
    method_config: dict[str, Any]
    pretrain: PretrainSection
    tracking: TrackingConfig
    data_path: str
    image_size: int
    train_rows: int
    cpus_per_worker: float
    run_id: str | None
    failure_marker: str
    log_model: bool = True


class KnnMonitor:
    """Weighted kNN top-1 of the encoder: a labeled bank from the train split, queries from the val split."""

    def __init__(self, job: PretrainJob, normalize, device: torch.device) -> None:
        p = job.pretrain
        bank_images, bank_labels = load_split_tensors(job.data_path, "train", job.image_size, labeled_only=True)
        if len(bank_labels) > p.knn_bank_size:
            keep = torch.randperm(len(bank_labels), generator=torch.Generator().manual_seed(p.seed))[: p.knn_bank_size]
            bank_images, bank_labels = bank_images[keep], bank_labels[keep]
        self.bank_images, self.bank_labels = bank_images, bank_labels
        self.val_images, self.val_labels = load_split_tensors(job.data_path, "val", job.image_size, labeled_only=True)
        self.num_classes = int(torch.cat([bank_labels, self.val_labels]).max()) + 1
        self.normalize, self.device, self.k, self.temperature = normalize, device, p.knn_k, p.knn_temperature

    def __call__(self, encoder: nn.Module) -> float:
        bank = extract_features(encoder, self.bank_images, device=self.device, normalize=self.normalize)
        queries = extract_features(encoder, self.val_images, device=self.device, normalize=self.normalize)
        # kNN on the worker's device (extract_features returns CPU features).
        accuracy = knn_accuracy(bank.to(self.device), self.bank_labels, queries.to(self.device), self.val_labels,
                                num_classes=self.num_classes, k=self.k, temperature=self.temperature)
        return accuracy["top1"]


def eval_normalizer(views: augment.ViewGenerator):
    """Mean/std normalisation of the method's views, for un-augmented evaluation images in [0, 1]."""
    first = next(iter(views.view_configs.values()))
    return lambda images: augment.normalize(images, first.mean, first.std)


def _maybe_inject_failure(job: PretrainJob, epoch: int, rank: int, world_size: int) -> None:
    """Test hook: the last worker raises once (guarded by a marker file) at the start of the given epoch."""
    target = job.pretrain.inject_failure_at_epoch
    marker = Path(job.failure_marker)
    if target is not None and epoch + 1 == target and rank == world_size - 1 and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"injected failure at epoch {target}\n")
        raise RuntimeError(f"injected failure at epoch {target} (pretrain.inject_failure_at_epoch)")


def _training_state(method: SSLMethod, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> dict[str, Any]:
    return {"model": method.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step}


def train_func(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker loop. Returns (on rank 0) the final metrics and the MLflow model URI."""
    import ray.train
    import ray.train.torch

    job = job_from_dict(PretrainJob, config)
    p = job.pretrain
    info = worker_info(job.cpus_per_worker)
    if job.run_id is not None:  # every rank records its Ray node: placement across nodes shows in the run's tags
        node_id = ray.get_runtime_context().get_node_id()
        tracking.set_tags(job.tracking, job.run_id, {tracking.node_tag(info.rank): node_id})
    method = build_method(job.method_name, job.method_config)
    views = method.view_generator()
    state = load_checkpoint_state()
    if state is not None:
        method.load_state_dict(state["model"])
    if uses_channels_last(info.device):
        method = method.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(method)
    if p.compile:
        model = compile_or_eager(model)

    global_batch = p.batch_size * info.world_size
    steps_per_epoch = job.train_rows // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"pretrain.batch_size={p.batch_size} x {info.world_size} workers exceeds the {job.train_rows} train rows"
        )
    total_steps = steps_per_epoch * p.epochs
    warmup_steps = round(p.warmup_epochs * steps_per_epoch)
    peak_lr = scaled_lr(p.lr, global_batch, p.lr_scaling)
    optimizer = build_optimizer(method.param_groups(p.weight_decay), p.optimizer, peak_lr, p.weight_decay)
    start_epoch, step = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]

    is_chief = info.rank == 0
    if state is not None and is_chief and job.run_id is not None:
        tracking.log_metrics(job.tracking, job.run_id, [(step, {"resumed_from_epoch": start_epoch})])
    monitor = KnnMonitor(job, eval_normalizer(views), info.device) if is_chief and _has_knn_data(job) else None
    guard = NonFiniteGuard(info.device, f"method {job.method_name}")
    shard = ray.train.get_dataset_shard("train")
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, p.epochs):
        _maybe_inject_failure(job, epoch, info.rank, info.world_size)
        generator = seed_epoch(p.seed, epoch, info.rank)
        step_rows: list[tuple[int, torch.Tensor, float]] = []
        loss_sum = torch.zeros((), device=info.device)
        started = time.perf_counter()
        batches = shard.iter_torch_batches(
            batch_size=p.batch_size, drop_last=True, device=info.device, pin_memory=info.device.type == "cuda",
            local_shuffle_buffer_size=min(4 * p.batch_size, job.train_rows), local_shuffle_seed=p.seed + epoch,
        )
        for batch_index, batch in enumerate(batches):
            if batch_index == steps_per_epoch:
                break
            lr = set_lr(optimizer, step, total_steps, warmup_steps, peak_lr, peak_lr * p.final_lr_fraction)
            batch_views = views(batch["image"], generator)
            batch_views = views_to_memory_format(batch_views, info.device)
            with autocast(info.device):
                loss = model(batch_views).loss
            if p.inject_nan_at_step == step:
                loss = loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip is not None:
                nn.utils.clip_grad_norm_(method.parameters(), p.grad_clip)
            optimizer.step()
            method.on_after_optimizer_step(step, total_steps)
            guard.update(step, loss)
            loss_sum += loss.detach()
            step_rows.append((step, loss.detach(), lr))
            step += 1
            if step % p.log_every_steps == 0:
                guard.check()
        guard.check()
        seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "loss": float(loss_sum) / max(1, len(step_rows)),
            "images_per_second": len(step_rows) * global_batch / seconds,
        }
        if monitor is not None and ((epoch + 1) % p.knn_every == 0 or epoch + 1 == p.epochs):
            metrics["knn_top1"] = monitor(method.encoder)
        checkpoint_due = (epoch + 1) % p.checkpoint_every == 0 or epoch + 1 == p.epochs
        state = _training_state(method, optimizer, epoch + 1, step) if checkpoint_due else None
        if is_chief:
            _log_epoch(job, step_rows, metrics)
        report(metrics, state, info.rank)
    if not is_chief:
        return None
    return _finish(job, method, metrics)


def _has_knn_data(job: PretrainJob) -> bool:
    splits = read_manifest(job.data_path)["splits"]
    return splits.get("val", {}).get("labeled", 0) > 0 and splits["train"].get("labeled", 0) > 0


def _log_epoch(job: PretrainJob, step_rows: list[tuple[int, torch.Tensor, float]], metrics: dict[str, float]) -> None:
    knn = f"  knn_top1 {metrics['knn_top1']:.4f}" if "knn_top1" in metrics else ""
    print(
        f"[pretrain] epoch {metrics['epoch']}/{job.pretrain.epochs}  loss {metrics['loss']:.4f}  "
        f"images/s {metrics['images_per_second']:.1f}{knn}",
        flush=True,
    )
    if job.run_id is None:
        return
    rows = [(s, {"train_loss": float(loss), "lr": lr}) for s, loss, lr in step_rows]
    epoch_values = {k: v for k, v in metrics.items() if k not in ("epoch", "step")}
    rows.append((int(metrics["epoch"]), {f"epoch_{k}": v for k, v in epoch_values.items()}))
    tracking.log_metrics(job.tracking, job.run_id, rows)


def _finish(job: PretrainJob, method: SSLMethod, metrics: dict[str, float]) -> dict[str, Any]:
    """Rank 0: log the encoder as an MLflow PyTorch model; return the stage's small result record."""
    record: dict[str, Any] = {"metrics": metrics, "encoder_uri": None}
    if job.run_id is not None and job.log_model:
        example = torch.zeros(2, 3, job.image_size, job.image_size)
        record["encoder_uri"] = tracking.log_torch_model(job.tracking, job.run_id, method.encoder, "encoder", example)
    return record


def pretrain_job(cfg: PipelineConfig, run_id: str | None, run_name: str, log_model: bool = True) -> PretrainJob:
    """The worker job for ``cfg``; ``log_model=False`` (Tune trials) skips logging the encoder to MLflow."""
    manifest = read_manifest(cfg.data.path)
    return PretrainJob(
        method_name=cfg.method.name,
        method_config=dict(cfg.method.config),
        pretrain=cfg.pretrain,
        tracking=cfg.tracking,
        data_path=cfg.data.path,
        image_size=cfg.data.image_size,
        train_rows=manifest["splits"]["train"]["rows"],
        cpus_per_worker=cfg.scaling.cpus_per_worker,
        run_id=run_id,
        failure_marker=str(Path(cfg.scaling.storage_path) / run_name / "injected_failure"),
        log_model=log_model,
    )


def run_pretrain(cfg: PipelineConfig, run_id: str | None, run_name: str) -> dict[str, Any]:
    """Driver: run the Ray Train job; log its last checkpoint as an artifact; return the result record."""
    from pipelines.ray_train import fit

    job = pretrain_job(cfg, run_id, run_name)
    dataset = read_split(cfg.data.path, "train", image_size=cfg.data.image_size)
    result = fit(train_func, dataclasses.asdict(job), cfg.scaling, run_name, {"train": dataset})
    record = dict(result.return_value or {})
    if result.checkpoint is not None and run_id is not None:
        with result.checkpoint.as_directory() as directory:
            record["checkpoint_uri"] = tracking.log_artifact(cfg.tracking, run_id, Path(directory) / "checkpoint.pt",
                                                             "checkpoints")
    return record
