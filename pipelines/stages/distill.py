"""Distillation stage (SimCLRv2, Sec. 2.3): the fine-tuned teacher labels every train image with its softened
predictions and a fresh student (``distill.student_backbone``) learns them, optionally mixed with the labeled loss.
The teacher is the one fine-tuned on ``distill.teacher_fraction`` (default ``finetune.label_fraction``).

Per batch (one crop-and-flip view of each image, seen by both networks)::

    loss = (1 - w) * DistillationLoss(T)(student_logits, teacher_logits) + w * CE(student_logits, label)

with ``w = distill.labeled_loss_weight`` and the CE averaged over the rows that carry a label (those of the
teacher's fine-tuning subset; the other rows have label -1). The driver streams all train rows; each Ray Train
worker loads the teacher from its MLflow model URI, frozen and in eval mode. Rank 0 logs the teacher's and the
student's test top-1 and val top-1 (the val split is never trained on; promotion gates on it) at the end, and the
student as the MLflow model ``student``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines import resume, supervised, tracking
from pipelines.config import PipelineConfig, from_dict
from pipelines.datasets import IF_FITS, labeled_subset_ids, read_manifest, read_split
from pipelines.ray_train import fit, train_run_name
from pipelines.scoring import labeled_split_top1
from pipelines.records import ClassifierRecord, FinetuneRecord, StageRecord
from pipelines.train_loop import train, worker_info
from ssl_core.classifier import Classifier, student_classifier
from ssl_core.device import model_to_memory_format
from ssl_core.losses import DistillationLoss
from ssl_core.methods import StepOutput
from ssl_core.training import Objective


@dataclass(frozen=True)
class DistillJob:
    """What a distillation worker needs; crosses the Ray boundary as ``dataclasses.asdict`` and is rebuilt once."""

    config: PipelineConfig
    run_id: str
    num_classes: int
    train_rows: int
    teacher_uri: str
    resume_from: str | None = None
    """An earlier attempt's checkpoint folder to start from (``pipelines.resume``)."""


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the rows with ``label >= 0``; 0 when there are none (no host sync).

    Shape: logits (batch, classes), labels (batch,) int64 with -1 = unlabeled -> scalar.
    """
    labeled = labels >= 0
    per_row = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return (per_row * labeled).sum() / labeled.sum().clamp(min=1)


def distillation_objective(teacher: Classifier, view: supervised.View, temperature: float,
                           labeled_loss_weight: float) -> Objective:
    """The objective of the module docstring on ``view(batch["image"])``; the teacher runs under ``no_grad``."""
    distillation = DistillationLoss(temperature)

    def objective(student: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> StepOutput:
        views = view(batch["image"], generator)
        with torch.no_grad():
            teacher_logits = teacher(views).float()
        student_logits = student(views).float()
        loss = distillation(student_logits, teacher_logits)
        if labeled_loss_weight == 0.0:
            return StepOutput(loss)
        labeled = masked_cross_entropy(student_logits, batch["label"])
        return StepOutput((1.0 - labeled_loss_weight) * loss + labeled_loss_weight * labeled)

    return objective


def _frozen_teacher(job: DistillJob, device: torch.device) -> Classifier:
    teacher = tracking.load_torch_model(job.config.tracking, job.teacher_uri)
    if not isinstance(teacher, Classifier):
        raise TypeError(f"teacher {job.teacher_uri} is a {type(teacher).__name__}, not an ssl_core Classifier")
    return model_to_memory_format(teacher.to(device).eval().requires_grad_(False), device)


def train_func(values: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker. Returns (on rank 0) ``{"model_uri", "metrics"}``."""
    job = from_dict(DistillJob, values)
    cfg, d = job.config, job.config.distill
    info = worker_info(cfg.scaling.cpus_per_worker, cfg.scaling.torch_threads, "distill")
    teacher = _frozen_teacher(job, info.device)
    normalization = teacher.normalization()
    student = student_classifier(d.student_backbone, cfg.data.image_size, job.num_classes, mean=normalization.mean,
                                 std=normalization.std)
    view = supervised.training_view(cfg.data.image_size, normalization, info.device)
    spec = supervised.loop_spec("distill", epochs=d.epochs, batch_size=d.batch_size, lr=d.lr,
                                weight_decay=d.weight_decay, rows=job.train_rows, seed=cfg.data.seed,
                                world_size=info.world_size, storage_path=cfg.scaling.storage_path)
    student, _ = train(student, distillation_objective(teacher, view, d.temperature, d.labeled_loss_weight), spec,
                       info, tracking_config=cfg.tracking, run_id=job.run_id, resume_from=job.resume_from)
    if not info.is_chief:
        return None
    student_top1, teacher_top1 = supervised.test_top1(cfg, info.device, student, teacher)
    results = {"teacher_test_top1": teacher_top1, "student_test_top1": student_top1, "test_top1": student_top1}
    val = labeled_split_top1(cfg.data.path, "val", cfg.data.image_size, info.device, student, teacher)
    if val is not None:  # what promote gates on; test_top1 is only reported
        results.update({"student_val_top1": val[0], "teacher_val_top1": val[1], "val_top1": val[0]})
        print(f"[distill] val top-1: teacher {val[1]:.4f}, student {val[0]:.4f}", flush=True)
    print(f"[distill] test top-1: teacher {teacher_top1:.4f}, student {student_top1:.4f}", flush=True)
    return supervised.finish(cfg, job.run_id, student, "student", results, d.epochs)


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> ClassifierRecord:
    """Distill the fine-tuned teacher into a fresh student on every train row; the labels of the fine-tuning subset
    feed the optional labeled loss. Metrics ``teacher_test_top1``, ``student_test_top1``, ``test_top1`` and, when
    the val split has labeled rows, ``teacher_val_top1``, ``student_val_top1``, ``val_top1`` (the promotion gate)."""
    teacher: FinetuneRecord = inputs["finetune"]
    supervised.check_test_split(cfg.data.path)
    fraction = cfg.teacher_fraction
    labeled_ids = labeled_subset_ids(cfg.data.path, "train", fraction, cfg.data.seed)
    train_rows = read_manifest(cfg.data.path)["splits"]["train"]["rows"]
    tracking.log_params(cfg.tracking, run_id, {"teacher_fraction": fraction})
    earlier = resume.resume_point(cfg, "distill", run_id, resume.earlier_attempts(cfg.tracking, run_id), "distill")
    job = DistillJob(cfg, run_id, teacher.num_classes, train_rows, teacher.teacher_uri(fraction),
                     None if earlier is None else earlier.checkpoint)
    dataset = read_split(cfg.data.path, "train", image_size=cfg.data.image_size, labeled_ids=labeled_ids,
                         materialize=IF_FITS)  # decoded once when it fits, not per epoch
    run_name = train_run_name("distill", run_id)
    result = fit(train_func, dataclasses.asdict(job), cfg.scaling, run_name, {"train": dataset})
    if result.return_value is None:
        raise RuntimeError(f"distill run {run_name} returned no record from rank 0")
    return ClassifierRecord(num_classes=teacher.num_classes, **result.return_value)
