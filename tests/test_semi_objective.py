"""``ssl_core.semi.SemiObjective``: every algorithm trains a tiny model for a step (finite loss, a gradient for
every parameter, one forward of the wrapped model per step as DDP needs), the temporal ensemble and the mean
teacher against loops, the pool subset, and the config's bounds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_core.augment import Normalization
from ssl_core.hparams import FieldValueError
from ssl_core.semi import ALGORITHMS, SemiConfig, SemiObjective, UnlabeledPool, pool_subset, semi_views
from ssl_core.semi.objective import TemporalEnsemble

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
    model = CountingWrapper(_model())
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
