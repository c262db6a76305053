"""A ViT method through the pipeline on real Ray Train (one worker; DDP is covered by the shared pipeline run) and
real MLflow: DINOv2-style pretraining with multi-crop and masked patches, evaluation, then fine-tuning and
distillation from the ViT encoder (its CLS token), as the stages run them."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.config import config_from_mapping
from pipelines.records import IngestRecord
from pipelines.stages import distill, evaluate, finetune, pretrain
from pipelines.stages.ingest import ingest
from ssl_core.backbones import VisionTransformer
from ssl_core.classifier import Classifier, classifier_from_method, student_classifier, top1_accuracy
from ssl_core.device import images_to_memory_format, model_to_memory_format
from ssl_core.evaluate import extract_features
from ssl_core.methods import build_method

TINY_DINOV2 = {"encoder_depth": 1, "out_dim": 32, "patch_out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16,
               "num_local_crops": 2}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits"
    ingest("builtin:digits", path)
    return path


def _stage(cfg, stage, inputs: dict) -> tuple[str, object]:
    name = stage.__name__.rsplit(".", 1)[-1]
    with tracking.run(cfg.tracking, name, {tracking.STAGE_TAG: name}) as run_id:
        return run_id, stage.run(cfg, run_id, inputs)


VIT_METHODS = {
    "dino": {"backbone": "vit_tiny", "encoder_depth": 1, "out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8},
    "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1},
    "ijepa": {"encoder_depth": 1, "predictor_dim": 16, "predictor_depth": 1, "predictor_heads": 1},
    "maskfeat": {"encoder_depth": 1},
    "dinov2": TINY_DINOV2,
}
"""The feature each ViT method's encoder hands to kNN, fine-tuning and distillation."""
POOLS = {"dino": "cls", "mae": "cls", "ijepa": "mean", "maskfeat": "mean", "dinov2": "cls"}


@pytest.mark.parametrize("name", sorted(VIT_METHODS))
def test_evaluation_and_fine_tuning_take_a_vit_encoder_as_it_is(name: str) -> None:
    """What evaluate / finetune / distill do with an encoder, without Ray: channels_last model and images, features
    of the encoder's own width, a classifier on them."""
    torch.manual_seed(0)
    method = build_method(name, {**VIT_METHODS[name], "image_size": 16})
    assert method.encoder.pool == POOLS[name]
    device = torch.device("cpu")
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    features = extract_features(model_to_memory_format(method.encoder, device), images,
                                normalize=method.normalization())
    assert features.shape == (6, 192) and torch.isfinite(features).all()
    classifier = model_to_memory_format(classifier_from_method(method, 0, 10), device)
    assert classifier.linear.in_features == 192
    logits = classifier(images_to_memory_format(torch.rand(6, 3, 16, 16), device))
    assert logits.shape == (6, 10)
    assert 0.0 <= top1_accuracy(classifier, images, torch.arange(6), device) <= 1.0


def test_a_vit_student_for_distillation() -> None:
    student = model_to_memory_format(student_classifier("vit_small", 16, 10), torch.device("cpu"))
    assert isinstance(student.encoder, VisionTransformer) and student.linear.in_features == 384
    assert student(torch.rand(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.slow
def test_vit_method_pretrains_evaluates_finetunes_and_distils(ray_session, tmp_path: Path, digits: Path) -> None:
    cfg = config_from_mapping(
        {
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "artifacts")},
            "data": {"path": str(digits), "image_size": 16},
            "method": {"name": "dinov2", "config": TINY_DINOV2},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "storage_path": str(tmp_path / "runs")},
            "pretrain": {"epochs": 1, "batch_size": 128, "optimizer": "adamw", "lr": 1e-3, "warmup_epochs": 0,
                         "knn_every": 1},
            "evaluate": {"linear_probe_epochs": 5},
            "finetune": {"label_fraction": 0.2, "epochs": 1, "batch_size": 32, "lr": 0.05, "head_layers": 0},
            "distill": {"student_backbone": "resnet8", "epochs": 1, "batch_size": 128, "lr": 0.05},
        },
        base=tmp_path,
    )
    pretrain_id, pretrained = _stage(cfg, pretrain, {})
    client = MlflowClient(cfg.tracking.uri)
    history = {key: [m.value for m in client.get_metric_history(pretrain_id, key)]
               for key in ("train_loss", "ibot_loss", "koleo_loss", "epoch_knn_top1")}
    assert history["train_loss"] and all(torch.isfinite(torch.tensor(history["train_loss"])))
    assert len(history["ibot_loss"]) == len(history["train_loss"])  # the method's logs reach MLflow per step
    assert len(history["epoch_knn_top1"]) == 1

    mlflow.set_tracking_uri(cfg.tracking.uri)
    encoder = mlflow.pytorch.load_model(pretrained.encoder_uri)
    assert isinstance(encoder, VisionTransformer) and encoder.pool == "cls"
    assert encoder(torch.rand(3, 3, 16, 16)).shape == (3, 192)

    _, evaluated = _stage(cfg, evaluate, {"ingest": IngestRecord(path=str(digits), content_hash="", num_classes=10),
                                          "pretrain": pretrained})
    assert {"knn_top1_ssl", "linear_top1_ssl", "knn_top1_random"} <= set(evaluated.metrics)
    assert all(0.0 <= value <= 1.0 for value in evaluated.metrics.values())

    _, teacher = _stage(cfg, finetune, {"pretrain": pretrained})
    _, student = _stage(cfg, distill, {"finetune": teacher})
    model = mlflow.pytorch.load_model(teacher.model_uri)
    assert isinstance(model, Classifier) and isinstance(model.encoder, VisionTransformer)
    assert model.feature_dim == 192 and model.linear.in_features == 192
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    assert 0.0 <= teacher.metrics["test_top1"] <= 1.0
    assert student.metrics["teacher_test_top1"] == pytest.approx(teacher.metrics["test_top1"])
    assert 0.0 <= student.metrics["student_test_top1"] <= 1.0

