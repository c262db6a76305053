"""What the two supervised stages, finetune and distill, share: their loop settings, their training view, the
test-split accuracy and rank 0's finish (metrics and the classifier as an MLflow model).

Both train an ``ssl_core.classifier.Classifier`` with SGD (Nesterov momentum 0.9) at the configured learning rate
(no batch-size scaling, no warm-up, cosine decay to 0; SimCLRv2 fine-tunes with momentum SGD / LARS), on one
random-resized-crop (scale 0.5-1) and flip view per image, a checkpoint every epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pipelines import tracking
from pipelines.config import PipelineConfig
from pipelines.datasets import load_split_tensors, read_manifest
from pipelines.train_loop import LoopSpec
from ssl_core.augment import Normalization, augment_view
from ssl_core.classifier import Classifier, top1_accuracy
from ssl_core.device import images_to_memory_format
from ssl_core.training import batch_plan
from ssl_core.views import crop_flip_view

View = Callable[[Tensor, torch.Generator], Tensor]
"""``view(images, generator)``: the training view of a uint8 batch (normalised float, on the batch's device)."""
OPTIMIZER = "sgd"
CHECK_EVERY_STEPS = 50
"""How often (in steps) the non-finite loss guard syncs with the host, besides the end of every epoch."""


def loop_spec(stage: str, *, epochs: int, batch_size: int, lr: float, weight_decay: float, rows: int, seed: int,
              world_size: int, storage_path: str | None = None) -> LoopSpec:
    """The loop of a supervised stage over ``rows`` rows; a batch that ``rows`` cannot fill shrinks;
    ``storage_path``: ``LoopSpec.storage_path``."""
    plan = batch_plan(rows, batch_size, world_size, f"{stage}.batch_size", shrink=True)
    return LoopSpec(stage=stage, what=stage, epochs=epochs, rows=rows, batch=plan, seed=seed, optimizer=OPTIMIZER,
                    lr=lr, weight_decay=weight_decay, check_every_steps=CHECK_EVERY_STEPS,
                    storage_path=storage_path)


def training_view(image_size: int, normalization: Normalization, device: torch.device) -> View:
    """The crop-and-flip view of a uint8 batch, normalised, in the device's memory layout."""
    cfg = crop_flip_view(image_size, (0.5, 1.0), normalization.mean, normalization.std)

    def view(images: Tensor, generator: torch.Generator) -> Tensor:
        return images_to_memory_format(augment_view(images, cfg, generator), device)

    return view


def check_test_split(data_path: str) -> None:
    """Fail before training when there is no labeled test split to report accuracy on."""
    test = read_manifest(data_path)["splits"].get("test", {})
    if test.get("labeled", 0) == 0:
        raise ValueError(f"{data_path} has no labeled test rows to measure test_top1 on")


def test_top1(cfg: PipelineConfig, device: torch.device, *models: Classifier) -> list[float]:
    """Top-1 of each of ``models`` on the labeled rows of the test split (decoded once)."""
    images, labels = load_split_tensors(cfg.data.path, "test", cfg.data.image_size, labeled_only=True)
    return [top1_accuracy(model, images, labels, device) for model in models]


def finish(cfg: PipelineConfig, run_id: str, model: Classifier, model_name: str, results: dict[str, float],
           epochs: int) -> dict[str, object]:
    """Rank 0: log ``results`` (at step ``epochs``) and ``model`` as the MLflow model ``model_name``; the worker's
    return value ``{"model_uri", "metrics"}``."""
    tracking.log_metrics(cfg.tracking, run_id, [(epochs, results)])
    example = torch.zeros(2, 3, cfg.data.image_size, cfg.data.image_size)
    model_uri = tracking.log_torch_model(cfg.tracking, run_id, model, model_name, example)
    return {"model_uri": model_uri, "metrics": results}
