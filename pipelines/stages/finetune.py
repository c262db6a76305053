"""Fine-tuning stage (SimCLRv2): the pretrained encoder plus the first ``finetune.head_layers`` blocks of its
projection head (``SSLMethod.finetune_head``), under a new linear classifier, trained with cross-entropy on a
class-balanced labeled fraction of the train split.

The driver picks the labeled subset (``labeled_subset_ids``) and streams exactly those rows through Ray Data;
each Ray Train worker downloads the pretrain checkpoint from MLflow and builds the classifier; rank 0 logs the
test-split top-1 at the end and the classifier as the MLflow model ``classifier``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines import supervised, tracking
from pipelines.config import PipelineConfig, from_dict
from pipelines.datasets import labeled_subset_ids, read_manifest, read_split
from pipelines.ray_train import fit, train_run_name
from pipelines.records import ClassifierRecord, PretrainRecord, StageRecord
from pipelines.train_loop import train, worker_info
from ssl_core.classifier import Classifier, classifier_from_method
from ssl_core.methods import StepOutput, build_method


@dataclass(frozen=True)
class FinetuneJob:
    """What a fine-tuning worker needs; crosses the Ray boundary as ``dataclasses.asdict`` and is rebuilt once."""

    config: PipelineConfig
    run_id: str
    num_classes: int
    num_labeled: int
    checkpoint_uri: str


def _pretrained_classifier(job: FinetuneJob) -> Classifier:
    cfg = job.config
    with tempfile.TemporaryDirectory() as directory:
        path = tracking.download_artifact(cfg.tracking, job.checkpoint_uri, directory)
        state = torch.load(path, map_location="cpu", weights_only=True)
    method = build_method(cfg.method.name, cfg.method.config)
    method.load_state_dict(state["model"])
    return classifier_from_method(method, cfg.finetune.head_layers, job.num_classes)


def train_func(values: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker. Returns (on rank 0) ``{"model_uri", "metrics"}``."""
    job = from_dict(FinetuneJob, values)
    cfg, f = job.config, job.config.finetune
    info = worker_info(cfg.scaling.cpus_per_worker)
    model = _pretrained_classifier(job)
    view = supervised.training_view(cfg.data.image_size, model.normalization(), info.device)

    def cross_entropy(wrapped: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> StepOutput:
        return StepOutput(F.cross_entropy(wrapped(view(batch["image"], generator)).float(), batch["label"]))

    spec = supervised.loop_spec("finetune", epochs=f.epochs, batch_size=f.batch_size, lr=f.lr,
                                weight_decay=f.weight_decay, rows=job.num_labeled, seed=cfg.data.seed,
                                world_size=info.world_size)
    model, _ = train(model, cross_entropy, spec, info, tracking_config=cfg.tracking, run_id=job.run_id)
    if not info.is_chief:
        return None
    [top1] = supervised.test_top1(cfg, info.device, model)
    results = {"test_top1": top1, "label_fraction": f.label_fraction, "num_labeled": job.num_labeled}
    print(f"[finetune] test top-1 {results['test_top1']:.4f} ({job.num_labeled} labeled rows)", flush=True)
    return supervised.finish(cfg, job.run_id, model, "classifier", results, f.epochs)


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> ClassifierRecord:
    """Fine-tune the pretrain checkpoint on ``finetune.label_fraction`` of the labeled train rows; metrics
    ``test_top1``, ``label_fraction``, ``num_labeled``."""
    pretrain: PretrainRecord = inputs["pretrain"]
    supervised.check_test_split(cfg.data.path)
    labeled_ids = labeled_subset_ids(cfg.data.path, "train", cfg.finetune.label_fraction, cfg.data.seed)
    num_classes = read_manifest(cfg.data.path)["num_classes"]
    job = FinetuneJob(cfg, run_id, num_classes, len(labeled_ids), pretrain.checkpoint_uri)
    dataset = read_split(cfg.data.path, "train", image_size=cfg.data.image_size, labeled_only=True,
                         labeled_ids=labeled_ids)
    run_name = train_run_name("finetune", run_id)
    result = fit(train_func, dataclasses.asdict(job), cfg.scaling, run_name, {"train": dataset})
    if result.return_value is None:
        raise RuntimeError(f"finetune run {run_name} returned no record from rank 0")
    return ClassifierRecord(num_classes=num_classes, **result.return_value)
