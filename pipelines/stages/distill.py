"""Distillation stage (SimCLRv2, Sec. 2.3): the fine-tuned teacher labels every train image with its softened
predictions and a fresh student (``distill.student_backbone``) learns them, optionally mixed with the labeled loss.

Per batch (one light-augmented view of each image, seen by both networks)::

    loss = (1 - w) * DistillationLoss(T)(student_logits, teacher_logits) + w * CE(student_logits, label)

with ``w = distill.labeled_loss_weight`` and the CE averaged over the rows that carry a label (those of the
fine-tuning subset; the other rows have label -1). ``run_distill`` (driver) streams all train rows; each Ray Train
worker loads the teacher from its MLflow model URI, frozen and in eval mode. Rank 0 logs the per-epoch loss, the
teacher's and the student's test top-1 at the end, and the student as the MLflow model ``student``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines import tracking
from pipelines.classifier import Classifier, student_classifier
from pipelines.config import DistillSection, PipelineConfig, TrackingConfig
from pipelines.datasets import labeled_subset_ids, read_split
from pipelines.stages.finetune import LossFn, check_test_split, evaluate_top1, train_classifier
from pipelines.stages.ingest import read_manifest
from pipelines.train_loop import job_from_dict, worker_info
from ssl_core.losses import DistillationLoss


@dataclass(frozen=True)
class DistillJob:
    """Everything a distillation worker needs; crosses the Ray boundary as a plain dict."""

    distill: DistillSection
    tracking: TrackingConfig
    data_path: str
    image_size: int
    num_classes: int
    train_rows: int
    teacher_uri: str
    cpus_per_worker: float
    seed: int
    run_id: str


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the rows with ``label >= 0``; 0 when there are none (no host sync).

    Shape: logits (batch, classes), labels (batch,) int64 with -1 = unlabeled -> scalar.
    """
    labeled = labels >= 0
    per_row = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return (per_row * labeled).sum() / labeled.sum().clamp(min=1)


def distillation_objective(teacher: Classifier, temperature: float, labeled_loss_weight: float) -> LossFn:
    """``loss_fn(student, views, labels)`` of the module docstring; the teacher runs under ``no_grad``."""
    distillation = DistillationLoss(temperature)

    def loss_fn(student: nn.Module, views: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(views).float()
        student_logits = student(views).float()
        loss = distillation(student_logits, teacher_logits)
        if labeled_loss_weight == 0.0:
            return loss
        return (1.0 - labeled_loss_weight) * loss + labeled_loss_weight * masked_cross_entropy(student_logits, labels)

    return loss_fn


def _frozen_teacher(job: DistillJob, device: torch.device) -> Classifier:
    teacher = tracking.load_torch_model(job.tracking, job.teacher_uri)
    if not isinstance(teacher, Classifier):
        raise TypeError(f"teacher {job.teacher_uri} is a {type(teacher).__name__}, not a pipelines Classifier")
    teacher = teacher.to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher


def train_func(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker loop. Returns (on rank 0) the stage record."""
    job = job_from_dict(DistillJob, config)
    d = job.distill
    info = worker_info(job.cpus_per_worker)
    teacher = _frozen_teacher(job, info.device)
    student = student_classifier(d.student_backbone, job.image_size, job.num_classes, mean=teacher.mean,
                                 std=teacher.std)
    student, _ = train_classifier(
        student, distillation_objective(teacher, d.temperature, d.labeled_loss_weight), stage="distill",
        rows=job.train_rows, batch_size=d.batch_size, epochs=d.epochs, lr=d.lr, weight_decay=d.weight_decay,
        seed=job.seed, image_size=job.image_size, tracking_config=job.tracking, run_id=job.run_id, info=info,
    )
    if info.rank != 0:
        return None
    student_top1 = evaluate_top1(student, job.data_path, job.image_size, info.device)
    teacher_top1 = evaluate_top1(teacher, job.data_path, job.image_size, info.device)
    results = {"teacher_test_top1": teacher_top1, "student_test_top1": student_top1, "test_top1": student_top1}
    tracking.log_metrics(job.tracking, job.run_id, [(d.epochs, results)])
    example = torch.zeros(2, 3, job.image_size, job.image_size)
    model_uri = tracking.log_torch_model(job.tracking, job.run_id, student, "student", example)
    print(f"[distill] test top-1: teacher {teacher_top1:.4f}, student {student_top1:.4f}", flush=True)
    return {"model_uri": model_uri, "metrics": results, "num_classes": job.num_classes}


def run_distill(cfg: PipelineConfig, run_id: str, run_name: str, finetune_record: dict[str, Any]) -> dict[str, Any]:
    """Driver: distill the fine-tuned teacher (``finetune_record["model_uri"]``) into a fresh student on every
    train row; the labels of the fine-tuning subset feed the optional labeled loss.

    Returns ``{"model_uri", "metrics": {"teacher_test_top1", "student_test_top1", "test_top1"}, "num_classes"}``.
    """
    from pipelines.ray_train import fit

    check_test_split(cfg.data.path)
    manifest = read_manifest(cfg.data.path)
    labeled_ids = labeled_subset_ids(cfg.data.path, "train", cfg.finetune.label_fraction, cfg.data.seed)
    job = DistillJob(
        distill=cfg.distill,
        tracking=cfg.tracking,
        data_path=cfg.data.path,
        image_size=cfg.data.image_size,
        num_classes=finetune_record["num_classes"],
        train_rows=manifest["splits"]["train"]["rows"],
        teacher_uri=finetune_record["model_uri"],
        cpus_per_worker=cfg.scaling.cpus_per_worker,
        seed=cfg.data.seed,
        run_id=run_id,
    )
    dataset = read_split(cfg.data.path, "train", image_size=cfg.data.image_size, labeled_ids=labeled_ids)
    result = fit(train_func, dataclasses.asdict(job), cfg.scaling, run_name, {"train": dataset})
    if result.return_value is None:
        raise RuntimeError(f"distill run {run_name} returned no record from rank 0")
    return dict(result.return_value)
