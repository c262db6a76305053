"""SimCLRv2 downstream: the labeled subset, the classifier builders, and pretrain -> finetune -> distill end to end
on real Ray Train and real MLflow."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.config import config_from_mapping
from pipelines.datasets import labeled_subset_ids, load_split_tensors, read_split
from pipelines.stages.distill import masked_cross_entropy
from pipelines.stages.ingest import ingest
from ssl_core.classifier import Classifier, classifier_from_method, student_classifier
from ssl_core.methods import build_method
from ssl_core.training import batch_plan

TINY_SIMCLR = {"backbone": "resnet8", "projection_hidden_dim": 32, "projection_dim": 16, "projection_layers": 3}
TINY_MAE = {"backbone": "vit_tiny", "image_size": 16, "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits"
    ingest("builtin:digits", path)
    return path


def _labeled_train(digits: Path) -> dict[str, int]:
    table = pq.read_table(sorted(str(p) for p in digits.glob("train-*.parquet")), columns=["id", "label", "split"])
    rows = [r for r in table.to_pylist() if r["split"] == "train" and r["label"] is not None]
    return {r["id"]: r["label"] for r in rows}


# ------------------------------------------------------------------------------------------- labeled subset


def test_labeled_subset_is_class_balanced_seeded_and_nested(digits: Path) -> None:
    labeled = _labeled_train(digits)
    per_class = Counter(labeled.values())
    ids = labeled_subset_ids(digits, "train", 0.1, seed=0)
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and set(ids) <= set(labeled)
    counts = Counter(labeled[i] for i in ids)
    assert counts == {c: max(1, int(n * 0.1 + 0.5)) for c, n in per_class.items()}
    assert labeled_subset_ids(digits, "train", 0.1, seed=0) == ids
    assert labeled_subset_ids(digits, "train", 0.1, seed=1) != ids
    assert set(labeled_subset_ids(digits, "train", 0.02, seed=0)) < set(ids)  # nested across fractions
    tiny = labeled_subset_ids(digits, "train", 0.0001, seed=0)
    assert Counter(labeled[i] for i in tiny) == {c: 1 for c in per_class}  # at least one per class
    assert set(labeled_subset_ids(digits, "train", 1.0, seed=0)) == set(labeled)
    with pytest.raises(ValueError, match="fraction=0"):
        labeled_subset_ids(digits, "train", 0.0, seed=0)


def test_labeled_ids_hide_the_other_labels(digits: Path) -> None:
    ids = labeled_subset_ids(digits, "train", 0.1, seed=0)
    images, labels = load_split_tensors(digits, "train", 8, labeled_only=True, labeled_ids=ids)
    assert len(images) == len(labels) == len(ids)
    _, all_labels = load_split_tensors(digits, "train", 8, labeled_only=False, labeled_ids=ids)
    assert (all_labels >= 0).sum() == len(ids) and len(all_labels) > len(ids)


def test_read_split_yields_exactly_the_labeled_subset(ray_session, digits: Path) -> None:
    ids = labeled_subset_ids(digits, "train", 0.1, seed=0)
    labeled = _labeled_train(digits)
    subset = read_split(digits, "train", image_size=8, labeled_only=True, labeled_ids=ids)
    labels = np.concatenate([b["label"] for b in subset.iter_batches(batch_size=512, batch_format="numpy")])
    assert sorted(labels.tolist()) == sorted(labeled[i] for i in ids)
    everything = read_split(digits, "train", image_size=8, labeled_ids=ids)
    all_labels = np.concatenate([b["label"] for b in everything.iter_batches(batch_size=512, batch_format="numpy")])
    assert (all_labels >= 0).sum() == len(ids) and len(all_labels) > len(ids)


# ---------------------------------------------------------------------------------------------- classifier


def test_classifier_from_a_pretrained_simclr_keeps_the_first_head_layers() -> None:
    pretrained = build_method("simclr", {**TINY_SIMCLR, "image_size": 16})
    method = build_method("simclr", {**TINY_SIMCLR, "image_size": 16})
    method.load_state_dict(pretrained.state_dict())
    classifier = classifier_from_method(method, 1, 10)
    assert classifier.head_out_dim == 32 and len(classifier.head) == 1
    assert torch.equal(classifier.head[0][0].weight, pretrained.projection_head.layers[0][0].weight)
    assert torch.equal(classifier.encoder.stem[0].weight, pretrained.encoder.stem[0].weight)
    assert (classifier.mean, classifier.std) == (method.normalization().mean, method.normalization().std)
    assert classifier(torch.rand(3, 3, 16, 16)).shape == (3, 10)
    plain = classifier_from_method(method, 0, 10)
    assert plain.head_out_dim == 64 and len(plain.head) == 0
    with pytest.raises(ValueError, match="head_layers=4 is out of range: method 'simclr' has 3 projection-head"):
        classifier_from_method(method, 4, 10)


def test_head_layers_need_a_projection_head(tmp_path: Path) -> None:
    method = build_method("mae", TINY_MAE)
    with pytest.raises(ValueError, match=r"head_layers=1 is out of range: method 'mae' has no projection head"):
        classifier_from_method(method, 1, 10)
    assert classifier_from_method(method, 0, 10)(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"^finetune\.head_layers=1 is out of range: method 'mae' has no projection"):
        config_from_mapping({"method": {"name": "mae"}, "finetune": {"head_layers": 1}}, tmp_path)


def test_student_and_losses() -> None:
    student = student_classifier("resnet8", 16, 10)
    assert isinstance(student, Classifier) and student(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    logits = torch.randn(4, 10)
    labels = torch.tensor([3, -1, 7, -1])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(masked_cross_entropy(logits, labels), expected)
    assert masked_cross_entropy(logits, torch.full((4,), -1)) == 0.0


def test_batch_plan_keeps_steps_equal_and_shrinks_small_subsets() -> None:
    assert batch_plan(130, 32, 2, "finetune", shrink=True).__dict__ == {"per_worker_batch": 32, "steps_per_epoch": 2,
                                                                        "reduced": False}
    assert batch_plan(50, 32, 2, "finetune", shrink=True).__dict__ == {"per_worker_batch": 25, "steps_per_epoch": 1,
                                                                       "reduced": True}
    with pytest.raises(ValueError, match="3 rows cannot give each of 2 workers a batch of at least 2"):
        batch_plan(3, 32, 2, "finetune", shrink=True)
    with pytest.raises(ValueError, match=r"pretrain.batch_size=32 x 2 workers exceeds the 50 train rows"):
        batch_plan(50, 32, 2, "pretrain.batch_size", shrink=False)


# ------------------------------------------------------------------------------------------------ end to end


def _history(cfg, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(cfg.tracking.uri).get_metric_history(run_id, key))


def _logits(model_uri: str) -> torch.Tensor:
    model = mlflow.pytorch.load_model(model_uri)
    with torch.no_grad():
        return model(torch.rand(5, 3, 16, 16))


def _fraction_runs(cfg, stage_run_id: str) -> dict[float, object]:
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{stage_run_id}'")
    return {float(run.data.params["label_fraction"]): run for run in runs}


def test_pretrain_finetune_distill_end_to_end(quickstart_run) -> None:
    """The shared pipeline run: FixMatch on two nested labeled fractions, on 2 Ray Train workers; distill takes the
    5% teacher."""
    cfg, records = quickstart_run.cfg, quickstart_run.result.records
    teacher, student = records["finetune"], records["distill"]
    finetune_id, distill_id, digits = teacher.run_id, student.run_id, Path(cfg.data.path)
    mlflow.set_tracking_uri(cfg.tracking.uri)

    runs = _fraction_runs(cfg, finetune_id)
    assert set(runs) == {0.05, 0.1} and set(teacher.teachers) == {"0.05", "0.1"}
    assert all(run.info.status == "FINISHED" and run.data.params["semi.algorithm"] == "fixmatch"
               for run in runs.values())
    assert teacher.model_uri == teacher.teachers["0.1"] != teacher.teachers["0.05"]
    assert teacher.num_classes == student.num_classes == 10
    for fraction, run in runs.items():
        run_id = run.info.run_id
        num_labeled = len(labeled_subset_ids(digits, "train", fraction, 0))
        assert _history(cfg, run_id, "num_labeled") == [(2, num_labeled)]
        assert [s for s, _ in _history(cfg, run_id, "epoch_loss")] == [1, 2]
        # 2 workers x 32 labeled rows (fewer when the subset cannot fill them), steps continuous across epochs
        per_worker = min(32, num_labeled // 2)
        steps = num_labeled // (2 * per_worker)
        assert _history(cfg, run_id, "steps_per_epoch") == [(0, steps)]
        assert [s for s, _ in _history(cfg, run_id, "train_loss")] == list(range(2 * steps))
        masks = [v for _, v in _history(cfg, run_id, "mask_rate")]
        assert len(masks) == 2 * steps and all(0.0 <= v <= 1.0 for v in masks)
        assert len(_history(cfg, run_id, "unsupervised_loss")) == 2 * steps
        top1 = teacher.metrics[f"test_top1_fraction_{fraction:g}"]
        assert _history(cfg, run_id, "test_top1") == [(2, pytest.approx(top1))]
        assert 0.0 <= top1 <= 1.0
    assert teacher.metrics["test_top1"] == teacher.metrics["test_top1_fraction_0.1"]
    assert teacher.metrics["label_fraction"] == 0.1
    assert _history(cfg, finetune_id, "test_top1_fraction_0.05") == [
        (0, pytest.approx(teacher.metrics["test_top1_fraction_0.05"]))]
    artifacts = [a.path for a in MlflowClient(cfg.tracking.uri).list_artifacts(finetune_id, "plots")]
    assert artifacts == ["plots/label_efficiency.png"]
    teacher_logits = _logits(teacher.teachers["0.05"])
    assert teacher_logits.shape == (5, 10) and torch.isfinite(teacher_logits).all()

    metrics = student.metrics
    assert set(metrics) == {"teacher_test_top1", "student_test_top1", "test_top1",
                            "teacher_val_top1", "student_val_top1", "val_top1"}  # val: the promotion gate
    assert metrics["test_top1"] == metrics["student_test_top1"] and 0.0 <= metrics["test_top1"] <= 1.0
    # the distilled teacher is the one of distill.teacher_fraction
    assert metrics["teacher_test_top1"] == pytest.approx(teacher.metrics["test_top1_fraction_0.05"])
    assert MlflowClient(cfg.tracking.uri).get_run(distill_id).data.params["teacher_fraction"] == "0.05"
    losses = _history(cfg, distill_id, "epoch_loss")
    assert [s for s, _ in losses] == [1] and np.isfinite(losses[0][1])
    student_logits = _logits(student.model_uri)
    assert student_logits.shape == (5, 10) and torch.isfinite(student_logits).all()
