"""What a fine-tuning worker runs, shared by the fine-tune stage and the tune stage's fine-tune trials: the job
that crosses the Ray boundary, the classifier built from the pretrain checkpoint, the objective (cross-entropy on
the labeled rows, or ``ssl_core.semi.SemiObjective`` with an unlabeled pool), and the trial's worker and driver.

A fine-tune trial (``tune.finetune``) is the fine-tune stage's training of ``finetune.label_fraction`` for
``tune.epochs``, scored after every epoch by rank 0's top-1 on the labeled rows of the ``val`` split (ingest's
``data.val_fraction`` of the labeled train images, disjoint from every labeled fraction, which are drawn from the
``train`` split): ``val_top1`` (``tune_spaces.semi_finetune.METRIC``), the metric Tune and ASHA read. It logs no
model and never looks at ``test``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines import supervised, tracking
from pipelines.config import PipelineConfig, from_dict
from pipelines.datasets import IF_FITS, labeled_subset_ids, load_split_tensors, read_manifest, read_split
from pipelines.knn_monitor import pretrain_rows
from pipelines.ray_train import fit
from pipelines.train_loop import LoopSpec, WorkerInfo, train, worker_info
from ssl_core.classifier import Classifier, classifier_from_method, top1_accuracy
from ssl_core.evaluate import extract_features
from ssl_core.methods import StepOutput, build_method
from ssl_core.semi import SemiObjective, UnlabeledPool, pool_subset, semi_views
from ssl_core.semi.propagation import propagated_labels
from ssl_core.semi.rotation import trained_classifier, training_model
from ssl_core.training import Objective
from tune_spaces import semi_finetune

@dataclass(frozen=True)
class FinetuneJob:
    """What a fine-tuning worker needs; crosses the Ray boundary as ``dataclasses.asdict`` and is rebuilt once."""

    config: PipelineConfig
    run_id: str
    """The fraction's (nested) MLflow run."""
    num_classes: int
    num_labeled: int
    label_fraction: float
    checkpoint_uri: str
    resume_from: str | None = None
    """An earlier attempt's checkpoint folder of this fraction to start from (``pipelines.resume``)."""


def pretrained_classifier(job: FinetuneJob) -> Classifier:
    """The pretrain checkpoint's encoder and ``finetune.head_layers`` head blocks under a new linear layer."""
    cfg = job.config
    with tempfile.TemporaryDirectory() as directory:
        path = tracking.download_artifact(cfg.tracking, job.checkpoint_uri, directory)
        state = torch.load(path, map_location="cpu", weights_only=True)
    # The pretrain checkpoint's memory bank (NPID, PCL, ...) has one row per pretraining image: build it that size.
    method = build_method(cfg.method.name, cfg.method.config, train_rows=pretrain_rows(read_manifest(cfg.data.path)))
    method.load_state_dict(state["model"])
    return classifier_from_method(method, cfg.finetune.head_layers, job.num_classes)


def unlabeled_pool(job: FinetuneJob, info: WorkerInfo) -> tuple[UnlabeledPool, UnlabeledPool]:
    """``(whole pool, this worker's part)``: the train rows with the fraction's labels (-1 elsewhere), at most
    ``semi.unlabeled_rows`` of them (``pool_subset``), the part being every ``world_size``-th row from ``rank``."""
    cfg = job.config
    labeled_ids = labeled_subset_ids(cfg.data.path, "train", job.label_fraction, cfg.data.seed)
    images, labels = load_split_tensors(cfg.data.path, "train", cfg.data.image_size, labeled_only=False,
                                        labeled_ids=labeled_ids)
    rows = pool_subset(labels, cfg.finetune.semi.unlabeled_rows, cfg.data.seed)
    part = rows[info.rank::info.world_size]
    return UnlabeledPool(images[rows], labels[rows]), UnlabeledPool(images[part], labels[part])


def finetune_objective(job: FinetuneJob, model: Classifier, info: WorkerInfo,
                       spec: LoopSpec) -> tuple[Objective, dict[str, Any]]:
    """The stage's objective and the loop hooks it needs (``after_step``, ``before_epoch``, and ``stateful``: its
    state, checkpointed with the model)."""
    cfg, semi = job.config, job.config.finetune.semi
    if semi.algorithm == "none":
        view = supervised.training_view(cfg.data.image_size, model.normalization(), info.device)

        def cross_entropy(wrapped: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> StepOutput:
            return StepOutput(F.cross_entropy(wrapped(view(batch["image"], generator)).float(), batch["label"]))

        return cross_entropy, {}
    pool, part = unlabeled_pool(job, info)
    propagated = None
    if semi.algorithm == "label_propagation":
        features = extract_features(model.encoder, pool.images, device=info.device, normalize=model.normalization())
        pseudo, weights = propagated_labels(features, pool.labels, job.num_classes, k=semi.propagation_k,
                                            alpha=semi.propagation_alpha, gamma=semi.propagation_gamma,
                                            iterations=semi.propagation_iterations)
        part_rows = torch.arange(len(pool.labels))[info.rank::info.world_size]
        propagated = (pseudo[part_rows], weights[part_rows])
    objective = SemiObjective(semi, part, job.num_classes, semi_views(cfg.data.image_size, model.normalization(),
                                                                      semi, info.device),
                              device=info.device, total_steps=spec.total_steps,
                              steps_per_epoch=spec.batch.steps_per_epoch, propagated=propagated)
    return objective, {"after_step": objective.after_step, "before_epoch": objective.before_epoch,
                       "stateful": objective}


def fine_tune(job: FinetuneJob, info: WorkerInfo,
              score: Callable[[Classifier], dict[str, float]] | None = None) -> Classifier:
    """Every worker's fine-tuning of ``job``: the pretrained classifier trained by the training loop under
    ``finetune_objective`` (with remixmatch's rotation head while it trains, ``ssl_core.semi.rotation``), resumed
    from ``job.resume_from`` if set; ``score(classifier)`` adds rank 0's metrics to every epoch's report. Returns
    the trained classifier."""
    cfg, f = job.config, job.config.finetune
    model = pretrained_classifier(job)
    spec = supervised.loop_spec("finetune", epochs=f.epochs, batch_size=f.batch_size, lr=f.lr,
                                weight_decay=f.weight_decay, rows=job.num_labeled, seed=cfg.data.seed,
                                world_size=info.world_size, storage_path=cfg.scaling.storage_path)
    objective, hooks = finetune_objective(job, model, info, spec)
    trained, _ = train(training_model(model, f.semi), objective, spec, info, tracking_config=cfg.tracking,
                       run_id=job.run_id, resume_from=job.resume_from,
                       epoch_metrics=None if score is None else (lambda epoch, final: score(model)), **hooks)
    return trained_classifier(trained)


def trial_train_func(values: dict[str, Any]) -> None:
    """Ray Train worker of a fine-tune trial: ``fine_tune``, with rank 0 adding ``val_top1`` to every epoch's
    report (see the module docstring)."""
    job = from_dict(FinetuneJob, values)
    cfg = job.config
    info = worker_info(cfg.scaling.cpus_per_worker, cfg.scaling.torch_threads, "finetune")
    if not info.is_chief:
        fine_tune(job, info)
        return
    images, labels = load_split_tensors(cfg.data.path, "val", cfg.data.image_size, labeled_only=True)
    fine_tune(job, info, lambda model: {semi_finetune.METRIC: top1_accuracy(model, images, labels, info.device)})


def fit_finetune_trial(cfg: PipelineConfig, run_id: str, run_name: str, checkpoint_uri: str,
                       callbacks: list[Any]):
    """Driver of one fine-tune trial (inside a Tune trainable): ``finetune.label_fraction``'s labeled rows of the
    train split streamed through Ray Data, ``trial_train_func`` on ``cfg.scaling``'s workers. A dataset without
    labeled ``val`` rows is refused here, naming ``data.val_fraction``."""
    manifest = read_manifest(cfg.data.path)
    if manifest["splits"].get("val", {}).get("labeled", 0) == 0:
        raise ValueError(f"tune.finetune scores trials on the labeled val split, and {cfg.data.path} has none: "
                         "ingest with data.val_fraction > 0")
    fraction = cfg.finetune.label_fraction
    labeled_ids = labeled_subset_ids(cfg.data.path, "train", fraction, cfg.data.seed)
    job = FinetuneJob(cfg, run_id, manifest["num_classes"], len(labeled_ids), fraction, checkpoint_uri)
    dataset = read_split(cfg.data.path, "train", image_size=cfg.data.image_size, labeled_only=True,
                         labeled_ids=labeled_ids,
                         materialize=IF_FITS)
    return fit(trial_train_func, dataclasses.asdict(job), cfg.scaling, run_name, {"train": dataset}, callbacks)
