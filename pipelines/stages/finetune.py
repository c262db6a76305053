"""Fine-tuning stage (SimCLRv2): the pretrained encoder plus the first ``finetune.head_layers`` blocks of its
projection head, under a new linear classifier, trained with cross-entropy on a class-balanced labeled fraction.

``run_finetune`` (driver) picks the labeled subset (``labeled_subset_ids``), streams exactly those rows through
Ray Data and runs ``train_func`` on Ray Train workers (DDP). Each worker downloads the pretrain checkpoint from
MLflow and builds the classifier; rank 0 logs the per-epoch loss, the test-split top-1 at the end and the
classifier as the MLflow model ``classifier``.

``train_classifier`` is the supervised worker loop shared with ``distill``: light augmentation on the device,
SGD (momentum 0.9, Nesterov) with a cosine learning-rate decay, a checkpoint every epoch (so a restarted worker
group resumes), the non-finite loss guard, and the same number of steps on every worker.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines import tracking
from pipelines.classifier import Classifier, classifier_from_pretrain_checkpoint, light_augmentation, top1_accuracy
from pipelines.config import FinetuneSection, PipelineConfig, TrackingConfig
from pipelines.datasets import labeled_subset_ids, load_split_tensors, read_split
from pipelines.stages.ingest import read_manifest
from pipelines.train_loop import (
    NonFiniteGuard,
    WorkerInfo,
    build_optimizer,
    job_from_dict,
    load_checkpoint_state,
    report,
    seed_epoch,
    set_lr,
    unwrap,
    worker_info,
)
from ssl_core import augment, optim
from ssl_core.device import autocast

OPTIMIZER = "sgd"
"""Fine-tuning and distillation optimizer: SGD with Nesterov momentum 0.9 (SimCLRv2 fine-tunes with momentum SGD /
LARS); the learning rate is used as given (no batch-size scaling) and decays with a cosine, without warm-up."""
CHECK_EVERY_STEPS = 50
"""How often (in steps) the non-finite loss guard syncs with the host, besides the end of every epoch."""

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""``loss_fn(model, views, labels) -> scalar loss``: views (B, 3, S, S) normalised, labels (B,) int64, -1 = none."""


@dataclass(frozen=True)
class BatchPlan:
    per_worker_batch: int
    steps_per_epoch: int
    reduced: bool


def batch_plan(rows: int, batch_size: int, world_size: int, what: str) -> BatchPlan:
    """Per-worker batch and steps per epoch such that every worker takes the same number of full batches.

    ``batch_size`` is per worker. When ``rows`` cannot fill one global batch, the per-worker batch shrinks to
    ``rows // world_size`` (``reduced``); fewer than 2 rows per worker (batch norm needs 2) raise ``ValueError``.
    """
    per_worker = batch_size
    if rows < batch_size * world_size:
        per_worker = rows // world_size
        if per_worker < 2:
            raise ValueError(
                f"{what}: {rows} rows cannot give each of {world_size} workers a batch of at least 2"
            )
    return BatchPlan(per_worker, rows // (per_worker * world_size), per_worker != batch_size)


def train_classifier(
    model: Classifier,
    loss_fn: LossFn,
    *,
    stage: str,
    rows: int,
    batch_size: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    image_size: int,
    tracking_config: TrackingConfig,
    run_id: str,
    info: WorkerInfo,
) -> tuple[Classifier, dict[str, float]]:
    """Train ``model`` on this worker's ``"train"`` dataset shard; returns the (unwrapped) model and the last
    epoch's metrics. Resumes from the Ray Train checkpoint when there is one.

    Rank 0 logs ``{stage}_loss``, ``lr`` and ``images_per_second`` per epoch (MLflow step = epoch number).
    """
    import ray.train
    import ray.train.torch

    plan = batch_plan(rows, batch_size, info.world_size, f"{stage}.batch_size={batch_size}")
    is_chief = info.rank == 0
    if is_chief:
        if plan.reduced:
            print(f"[{stage}] {rows} rows cannot fill {info.world_size} x {stage}.batch_size={batch_size}: "
                  f"using {plan.per_worker_batch} per worker", flush=True)
        tracking.log_metrics(tracking_config, run_id, [(0, {"per_worker_batch_size": plan.per_worker_batch,
                                                            "steps_per_epoch": plan.steps_per_epoch})])
    state = load_checkpoint_state()
    if state is not None:
        model.load_state_dict(state["model"])
    if info.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    wrapped = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(optim.param_groups(model, weight_decay), OPTIMIZER, lr, weight_decay)
    start_epoch, step = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        if is_chief:
            tracking.log_metrics(tracking_config, run_id, [(step, {"resumed_from_epoch": start_epoch})])

    view = light_augmentation(image_size, model.mean, model.std)
    total_steps = plan.steps_per_epoch * epochs
    guard = NonFiniteGuard(info.device, f"{stage}")
    shard = ray.train.get_dataset_shard("train")
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, epochs):
        generator = seed_epoch(seed, epoch, info.rank)
        loss_sum = torch.zeros((), device=info.device)
        started = time.perf_counter()
        batches = shard.iter_torch_batches(
            batch_size=plan.per_worker_batch, drop_last=True, device=info.device,
            local_shuffle_buffer_size=min(4 * plan.per_worker_batch, rows), local_shuffle_seed=seed + epoch,
        )
        lr_now = lr
        for batch_index, batch in enumerate(batches):
            if batch_index == plan.steps_per_epoch:
                break
            lr_now = set_lr(optimizer, step, total_steps, 0, lr, 0.0)
            views = augment.augment_view(batch["image"], view, generator)
            if info.device.type == "cuda":
                views = views.contiguous(memory_format=torch.channels_last)
            with autocast(info.device):
                loss = loss_fn(wrapped, views, batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            guard.update(step, loss)
            loss_sum += loss.detach()
            step += 1
            if step % CHECK_EVERY_STEPS == 0:
                guard.check()
        guard.check()
        seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            f"{stage}_loss": float(loss_sum) / plan.steps_per_epoch,
            "lr": lr_now,
            "images_per_second": plan.steps_per_epoch * plan.per_worker_batch * info.world_size / seconds,
        }
        if is_chief:
            print(f"[{stage}] epoch {epoch + 1}/{epochs}  loss {metrics[f'{stage}_loss']:.4f}  "
                  f"images/s {metrics['images_per_second']:.1f}", flush=True)
            epoch_values = {k: v for k, v in metrics.items() if k not in ("epoch", "step")}
            tracking.log_metrics(tracking_config, run_id, [(epoch + 1, epoch_values)])
        checkpoint = None
        if is_chief:
            checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                          "step": step}
        report(metrics, checkpoint, info.rank)
    return unwrap(wrapped), metrics


def evaluate_top1(model: Classifier, data_path: str, image_size: int, device: torch.device) -> float:
    """Top-1 of ``model`` on the labeled rows of the test split."""
    images, labels = load_split_tensors(data_path, "test", image_size, labeled_only=True)
    return top1_accuracy(model, images, labels, device)


def check_test_split(data_path: str) -> None:
    """Fail before training when there is no labeled test split to report accuracy on."""
    test = read_manifest(data_path)["splits"].get("test", {})
    if test.get("labeled", 0) == 0:
        raise ValueError(f"{data_path} has no labeled test rows to measure test_top1 on")


# ------------------------------------------------------------------------------------------------ the stage


@dataclass(frozen=True)
class FinetuneJob:
    """Everything a fine-tuning worker needs; crosses the Ray boundary as a plain dict."""

    method_name: str
    method_config: dict[str, Any]
    finetune: FinetuneSection
    tracking: TrackingConfig
    data_path: str
    image_size: int
    num_classes: int
    num_labeled: int
    checkpoint_uri: str
    cpus_per_worker: float
    seed: int
    run_id: str


def _cross_entropy(model: nn.Module, views: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(model(views).float(), labels)


def _pretrained_classifier(job: FinetuneJob) -> Classifier:
    with tempfile.TemporaryDirectory() as directory:
        path = tracking.download_artifact(job.tracking, job.checkpoint_uri, directory)
        state = torch.load(path, map_location="cpu", weights_only=True)
    return classifier_from_pretrain_checkpoint(
        job.method_name, job.method_config, state, job.finetune.head_layers, job.num_classes
    )


def train_func(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker loop. Returns (on rank 0) the stage record."""
    job = job_from_dict(FinetuneJob, config)
    f = job.finetune
    info = worker_info(job.cpus_per_worker)
    model, metrics = train_classifier(
        _pretrained_classifier(job), _cross_entropy, stage="finetune", rows=job.num_labeled,
        batch_size=f.batch_size, epochs=f.epochs, lr=f.lr, weight_decay=f.weight_decay, seed=job.seed,
        image_size=job.image_size, tracking_config=job.tracking, run_id=job.run_id, info=info,
    )
    if info.rank != 0:
        return None
    results = {
        "test_top1": evaluate_top1(model, job.data_path, job.image_size, info.device),
        "label_fraction": f.label_fraction,
        "num_labeled": job.num_labeled,
    }
    tracking.log_metrics(job.tracking, job.run_id, [(f.epochs, results)])
    example = torch.zeros(2, 3, job.image_size, job.image_size)
    model_uri = tracking.log_torch_model(job.tracking, job.run_id, model, "classifier", example)
    print(f"[finetune] test top-1 {results['test_top1']:.4f} ({job.num_labeled} labeled rows)", flush=True)
    return {"model_uri": model_uri, "metrics": results, "num_classes": job.num_classes}


def run_finetune(cfg: PipelineConfig, run_id: str, run_name: str, pretrain_record: dict[str, Any]) -> dict[str, Any]:
    """Driver: fine-tune the pretrained checkpoint on ``finetune.label_fraction`` of the labeled train rows.

    Returns ``{"model_uri", "metrics": {"test_top1", "label_fraction", "num_labeled"}, "num_classes"}``.
    """
    from pipelines.ray_train import fit

    check_test_split(cfg.data.path)
    labeled_ids = labeled_subset_ids(cfg.data.path, "train", cfg.finetune.label_fraction, cfg.data.seed)
    job = FinetuneJob(
        method_name=cfg.method.name,
        method_config=dict(cfg.method.config),
        finetune=cfg.finetune,
        tracking=cfg.tracking,
        data_path=cfg.data.path,
        image_size=cfg.data.image_size,
        num_classes=read_manifest(cfg.data.path)["num_classes"],
        num_labeled=len(labeled_ids),
        checkpoint_uri=pretrain_record["checkpoint_uri"],
        cpus_per_worker=cfg.scaling.cpus_per_worker,
        seed=cfg.data.seed,
        run_id=run_id,
    )
    dataset = read_split(cfg.data.path, "train", image_size=cfg.data.image_size, labeled_only=True,
                         labeled_ids=labeled_ids)
    result = fit(train_func, dataclasses.asdict(job), cfg.scaling, run_name, {"train": dataset})
    if result.return_value is None:
        raise RuntimeError(f"finetune run {run_name} returned no record from rank 0")
    return dict(result.return_value)
