"""``ssl_core.semi.SemiObjective``: every algorithm trains a tiny model for a step (finite loss, a gradient for
every parameter, one forward of the wrapped model per step as DDP needs), the temporal ensemble and the mean
teacher against loops, ReMixMatch's rotation loss against a naive reference, a resumed objective against an
uninterrupted one, the pool subset, and the config's bounds."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from ssl_core.augment import Normalization
from ssl_core.classifier import Classifier
from ssl_core.hparams import FieldValueError
from ssl_core.optim import build_optimizer, param_groups
from ssl_core.semi import ALGORITHMS, SemiConfig, SemiObjective, UnlabeledPool, pool_subset, semi_views
from ssl_core.semi.objective import TemporalEnsemble
from ssl_core.semi.rotation import RotationHeaded, random_rotations, rotation_loss, trained_classifier, training_model
from ssl_core.training import TrainStep

CLASSES, SIZE = 4, 8


class CountingWrapper(nn.Module):
    """Stands in for DDP: exposes ``.module`` and counts its forwards."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.module(images)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, CLASSES))


class TinyEncoder(nn.Sequential):
    feature_dim = 16


def _classifier() -> Classifier:
    """A tiny ``Classifier`` whose linear layer is random (a zero one would pass no gradient to the encoder)."""
    torch.manual_seed(0)
    classifier = Classifier(TinyEncoder(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(2), nn.Flatten()), nn.Sequential(), CLASSES,
                            mean=(0.0,) * 3, std=(1.0,) * 3)
    nn.init.normal_(classifier.linear.weight, std=0.5)
    return classifier


def _pool(rows: int = 40) -> UnlabeledPool:
    images = torch.randint(0, 256, (rows, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.full((rows,), -1)
    labels[:8] = torch.arange(8) % CLASSES
    return UnlabeledPool(images, labels)


def _objective(cfg: SemiConfig, pool: UnlabeledPool) -> SemiObjective:
    propagated = None
    if cfg.algorithm == "label_propagation":
        propagated = (torch.arange(len(pool.labels)) % CLASSES, torch.linspace(0.1, 1.0, len(pool.labels)))
    views = semi_views(SIZE, Normalization(), cfg, torch.device("cpu"))
    return SemiObjective(cfg, pool, CLASSES, views, device=torch.device("cpu"), total_steps=10, steps_per_epoch=5,
                         propagated=propagated)


def _batch() -> dict[str, torch.Tensor]:
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    return {"image": images, "label": torch.tensor([0, 1, 2, 3])}


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "none"])
def test_every_algorithm_trains_every_parameter_with_one_wrapped_forward(algorithm: str) -> None:
    cfg = SemiConfig(algorithm=algorithm, unlabeled_ratio=2, threshold=0.0, augmentations=2)
    objective = _objective(cfg, _pool())
    model = CountingWrapper(training_model(_classifier(), cfg) if algorithm == "remixmatch" else _model())
    out = objective(model, _batch(), torch.Generator().manual_seed(0))
    assert model.calls == 1
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(out.logs["supervised_loss"].item()
                                            + out.logs["unsupervised_weight"].item()
                                            * out.logs["unsupervised_loss"].item(), rel=1e-5)
    out.loss.backward()
    for name, parameter in model.module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    if algorithm in ("pseudo_label", "fixmatch", "uda"):
        assert out.logs["mask_rate"].item() == 1.0  # threshold 0 keeps every row


def test_none_has_no_unlabeled_objective_and_label_propagation_needs_labels() -> None:
    with pytest.raises(ValueError, match="algorithm=none has no unlabeled objective"):
        _objective(SemiConfig(), _pool())
    views = semi_views(SIZE, Normalization(), SemiConfig(), torch.device("cpu"))
    with pytest.raises(ValueError, match="label_propagation needs the propagated labels"):
        SemiObjective(SemiConfig(algorithm="label_propagation"), _pool(), CLASSES, views, device=torch.device("cpu"),
                      total_steps=1, steps_per_epoch=1)


def test_temporal_ensemble_is_a_bias_corrected_ema_per_row() -> None:
    ensemble = TemporalEnsemble(5, 3, 0.6, torch.device("cpu"))
    history = {row: [] for row in range(5)}
    generator = torch.Generator().manual_seed(0)
    for rows in ([0, 1], [1, 2], [1, 3]):
        probabilities = torch.softmax(torch.randn(2, 3, generator=generator), 1)
        ensemble.update(torch.tensor(rows), probabilities)
        for row, p in zip(rows, probabilities):
            history[row].append(p)
    targets, seen = ensemble.targets(torch.arange(5))
    assert seen.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    for row in range(4):
        z = torch.zeros(3)
        for p in history[row]:
            z = 0.6 * z + 0.4 * p
        assert torch.allclose(targets[row], z / (1 - 0.6 ** len(history[row])))
    assert torch.equal(targets[4], torch.zeros(3))


def test_mean_teacher_follows_the_student_by_ema_and_the_step_count_resumes() -> None:
    cfg = SemiConfig(algorithm="mean_teacher", unlabeled_ratio=1, ema_momentum=0.9)
    objective = _objective(cfg, _pool())
    model = _model()
    objective(model, _batch(), torch.Generator().manual_seed(0))
    teacher_before = [p.clone() for p in objective.teacher.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    objective.after_step(3, 10)
    for before, student, teacher in zip(teacher_before, model.parameters(), objective.teacher.parameters()):
        assert torch.allclose(teacher, 0.9 * before + 0.1 * student)
        assert not teacher.requires_grad
    assert objective.step == 4
    objective.before_epoch(1)
    assert objective.step == 5  # epoch 1 starts at steps_per_epoch


def test_pool_subset_keeps_every_labeled_row_and_is_seeded() -> None:
    labels = torch.tensor([-1] * 20 + [1, 2, 3] + [-1] * 7)
    rows = pool_subset(labels, 10, seed=0)
    assert len(rows) == 10 and {20, 21, 22} <= set(rows.tolist()) and rows.tolist() == sorted(rows.tolist())
    assert torch.equal(rows, pool_subset(labels, 10, seed=0)) and not torch.equal(rows, pool_subset(labels, 10, 1))
    assert torch.equal(pool_subset(labels, 100, seed=0), torch.arange(30))
    with pytest.raises(ValueError, match="one label per image"):
        UnlabeledPool(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), torch.zeros(2))


def test_semi_config_bounds_and_names() -> None:
    with pytest.raises(FieldValueError, match=r"algorithm='flexmatch' is not one of"):
        SemiConfig(algorithm="flexmatch")
    with pytest.raises(FieldValueError, match=r"threshold=1.5 is out of range \[0.0, 1.0\]"):
        SemiConfig(threshold=1.5)
    with pytest.raises(FieldValueError, match="strong_ops=0 must be > 0"):
        SemiConfig(algorithm="remixmatch", strong_ops=0, cutout=0.0)


def _naive_quarter_turn(image: torch.Tensor) -> torch.Tensor:
    """90 degrees counter-clockwise by index: out[c][i][j] = in[c][j][n - 1 - i]."""
    size = image.shape[-1]
    out = torch.empty_like(image)
    for c in range(image.shape[0]):
        for i in range(size):
            for j in range(size):
                out[c, i, j] = image[c, j, size - 1 - i]
    return out


def test_rotation_loss_and_rotated_views_match_a_naive_reference() -> None:
    images = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    rotated, turns = random_rotations(images, torch.Generator().manual_seed(1))
    assert set(turns.tolist()) > {0} and turns.dtype == torch.int64
    for image, out, k in zip(images, rotated, turns.tolist()):
        expected = image
        for _ in range(k):
            expected = _naive_quarter_turn(expected)
        assert torch.equal(out, expected)
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    naive = 0.0
    for row, k in zip(logits.tolist(), turns.tolist()):
        naive += -(row[k] - math.log(sum(math.exp(v) for v in row))) / len(turns)
    assert rotation_loss(logits, turns).item() == pytest.approx(naive, rel=1e-5)
    with pytest.raises(ValueError, match="rotation logits need 4 columns"):
        rotation_loss(torch.zeros(6, 5), turns)


def test_remixmatch_adds_rotation_weight_times_the_rotation_loss_of_its_own_head() -> None:
    classifier = _classifier()
    model = training_model(classifier, SemiConfig(algorithm="remixmatch"))
    assert isinstance(model, RotationHeaded) and trained_classifier(model) is classifier
    assert training_model(classifier, SemiConfig(algorithm="remixmatch", rotation_weight=0.0)) is classifier
    images = torch.randn(3, 3, SIZE, SIZE)
    assert torch.equal(model(images)[:, :CLASSES], classifier(images))
    outputs = {}
    for weight in (0.5, 2.0):
        cfg = SemiConfig(algorithm="remixmatch", unlabeled_ratio=2, augmentations=2, rotation_weight=weight)
        outputs[weight] = _objective(cfg, _pool())(model, _batch(), torch.Generator().manual_seed(0))
    rotation = outputs[0.5].logs["rotation_loss"]
    assert torch.equal(rotation, outputs[2.0].logs["rotation_loss"]) and rotation > 0
    difference = outputs[2.0].logs["unsupervised_loss"] - outputs[0.5].logs["unsupervised_loss"]
    assert difference.item() == pytest.approx(1.5 * rotation.item(), rel=1e-4)
    outputs[2.0].loss.backward()
    assert model.rotation.weight.grad.abs().sum() > 0
    cfg = SemiConfig(algorithm="remixmatch", unlabeled_ratio=2, augmentations=2)
    with pytest.raises(ValueError, match="needs a model with 8 outputs"):
        _objective(cfg, _pool())(classifier, _batch(), torch.Generator().manual_seed(0))


def _train(algorithm: str, epochs: range, state: dict | None, restore_objective: bool = True
           ) -> tuple[list[float], dict, nn.Module]:
    """One step per epoch of ``epochs`` from ``state`` (model, optimizer, objective) as the training loop runs
    them (a generator seeded per epoch, ``before_epoch`` / ``after_step`` hooks); the per-step losses, the state
    after the last epoch (through ``torch.save`` / ``torch.load(weights_only=True)``) and the model."""
    cfg = SemiConfig(algorithm=algorithm, unlabeled_ratio=2, augmentations=2, ema_momentum=0.5,
                     ensemble_momentum=0.5, alignment_momentum=0.5, rotation_weight=0.5)
    model = training_model(_classifier(), cfg)
    objective = SemiObjective(cfg, _pool(), CLASSES, semi_views(SIZE, Normalization(), cfg, torch.device("cpu")),
                              device=torch.device("cpu"), total_steps=3, steps_per_epoch=1)
    optimizer = build_optimizer(param_groups(model, 0.0), "sgd", 0.1, 0.0)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if restore_objective:
            objective.load_state_dict(state["semi"])
    step = TrainStep(model, objective, optimizer, lambda s: 0.1, device=torch.device("cpu"), what=algorithm,
                     after_step=lambda s: objective.after_step(s, 3))
    losses = []
    for epoch in epochs:
        objective.before_epoch(epoch)
        generator = torch.Generator().manual_seed(epoch)
        batch = {"image": torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator),
                 "label": torch.tensor([0, 1, 2, 3])}
        losses.append(step(batch, epoch, generator)[0].loss.item())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "semi": objective.state_dict()},
               buffer)
    buffer.seek(0)
    return losses, torch.load(buffer, weights_only=True), model


@pytest.mark.parametrize("algorithm", ["temporal_ensembling", "mean_teacher", "remixmatch"])
def test_a_resumed_objective_continues_exactly_as_an_uninterrupted_one(algorithm: str) -> None:
    uninterrupted, _, model = _train(algorithm, range(3), None)
    first, checkpoint, _ = _train(algorithm, range(2), None)
    resumed, _, resumed_model = _train(algorithm, range(2, 3), checkpoint)
    assert first + resumed == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)
    for (name, value), resumed_value in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(value.float(), resumed_value.float(), atol=1e-6), name
    restarted, _, _ = _train(algorithm, range(2, 3), checkpoint, restore_objective=False)
    assert restarted != pytest.approx(resumed, rel=1e-6, abs=1e-7)  # the state matters: without it, it differs
    with pytest.raises(ValueError, match="checkpointed semi state is of algorithm"):
        _objective(SemiConfig(algorithm="fixmatch"), _pool()).load_state_dict(checkpoint["semi"])
