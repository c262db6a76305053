"""PCL: its tiny config; k-means, the concentration and ProtoNCE against naive loops; when it clusters; the
prototypes through a checkpoint; bad cluster counts."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from ssl_core.hparams import FieldValueError
from ssl_core.kmeans import concentration, kmeans
from ssl_core.losses import ProtoNCELoss
from ssl_core.methods import build_method
from ssl_core.methods.base import ROW_INDEX

TINY = {"image_size": 16, "projection_hidden_dim": 64, "projection_dim": 32, "queue_size": 64, "bank_size": 32,
        "num_clusters": (2, 4)}
LEARNING = {"prototype_warmup_epochs": 0.0}
"""Prototypes from the first step on, so the learning test's window compares steps with the same objective."""


def naive_kmeans(points: list[list[float]], centroids: list[list[float]],
                 iterations: int) -> tuple[list[list[float]], list[int]]:
    def nearest(p: list[float]) -> int:
        distances = [sum((a - b) ** 2 for a, b in zip(p, c)) for c in centroids]
        return distances.index(min(distances))

    for _ in range(iterations):
        assigned = [nearest(p) for p in points]
        for j in range(len(centroids)):
            members = [p for p, a in zip(points, assigned) if a == j]
            if members:
                centroids[j] = [sum(column) / len(members) for column in zip(*members)]
    return centroids, [nearest(p) for p in points]


def test_kmeans_matches_lloyd_loop_from_the_same_start() -> None:
    points = torch.randn(40, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    centroids, assigned = kmeans(points, 4, iterations=5, generator=torch.Generator().manual_seed(1))
    start = torch.randperm(40, generator=torch.Generator().manual_seed(1))[:4]
    expected_centroids, expected = naive_kmeans(points.tolist(), points[start].tolist(), 5)
    assert assigned.tolist() == expected
    torch.testing.assert_close(centroids, torch.tensor(expected_centroids, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"num_clusters=41 must be in \[1, 40\]"):
        kmeans(points, 41)


def test_concentration_matches_the_papers_formula() -> None:
    generator = torch.Generator().manual_seed(2)
    points = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    assigned = torch.tensor([0] * 10 + [1] * 12 + [2] * 7 + [3])  # cluster 3 is a singleton
    centroids = torch.stack([points[assigned == j].mean(0) for j in range(4)])
    phi = []
    for j in range(4):
        members = [p for p, a in zip(points.tolist(), assigned.tolist()) if a == j]
        distances = [math.sqrt(sum((x - c) ** 2 for x, c in zip(p, centroids[j].tolist()))) for p in members]
        phi.append(sum(distances) / (len(members) * math.log(len(members) + 10)) if len(members) > 1 else None)
    largest = max(v for v in phi if v is not None)
    phi = np.array([largest if v is None else v for v in phi])
    phi = np.clip(phi, np.percentile(phi, 10), np.percentile(phi, 90))
    expected = 0.3 * phi / phi.mean()
    np.testing.assert_allclose(concentration(points, centroids, assigned, 0.3).numpy(), expected, rtol=1e-6)


def test_proto_nce_matches_naive_loop() -> None:
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    prototypes = [torch.randn(2, 4, generator=generator, dtype=torch.float64),
                  torch.randn(3, 4, generator=generator, dtype=torch.float64)]
    phis = [torch.tensor([0.2, 0.5], dtype=torch.float64), torch.tensor([0.1, 0.3, 0.4], dtype=torch.float64)]
    assigned = [torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])]
    expected = 0.0
    for c, phi, a in zip(prototypes, phis, assigned):
        for b in range(3):
            v = features[b] / features[b].norm()
            scores = [float(v @ (c[j] / c[j].norm())) / float(phi[j]) for j in range(len(c))]
            expected -= (scores[a[b]] - math.log(sum(math.exp(s) for s in scores))) / 3 / 2
    assert float(ProtoNCELoss()(features, prototypes, phis, assigned)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="non-empty lists of equal length"):
        ProtoNCELoss()(features, prototypes, phis[:1], assigned)


def _step(method, rows: list[int], step: int) -> torch.Tensor:
    images = torch.randint(0, 256, (len(rows), 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(step))
    views = {**method.view_generator()(images, torch.Generator().manual_seed(step)), ROW_INDEX: torch.tensor(rows)}
    out = method.training_step(views)
    out.loss.backward()
    method.on_after_optimizer_step(step, 100)
    return out.logs["proto_nce_loss"]


def test_clusters_the_bank_once_per_epoch_after_warmup_and_survives_a_checkpoint() -> None:
    torch.manual_seed(0)
    config = {**TINY, "backbone": "resnet8", "bank_size": 8, "prototype_warmup_epochs": 2.0}
    method = build_method("pcl", config)
    for step in range(3):  # batch 4 of 8 rows: epoch boundaries after steps 1, 3, 5...; warm-up ends at epoch 2
        _step(method, [4 * (step % 2) + i for i in range(4)], step)
        assert float(method.prototypes_ready) == 0.0 and int(method.clusterings_done) == 0
    _step(method, list(range(4, 8)), 3)
    assert float(method.prototypes_ready) == 1.0 and int(method.clusterings_done) == 1
    generator = torch.Generator().manual_seed(0)  # the first clustering's seed, drawn from by both granularities
    for m, k in enumerate((2, 4)):
        _, expected = kmeans(method.bank.features, k, 10, generator)
        assert torch.equal(getattr(method, f"assignments_{m}"), expected)
    assert len(method.assignments_0.unique()) == 2 and method.concentration_1.mean().item() == pytest.approx(0.2)

    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = build_method("pcl", config)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for name in ("prototypes_0", "concentration_1", "assignments_1", "prototypes_ready", "clusterings_done"):
        assert torch.equal(getattr(restored, name), getattr(method, name)), name
    assert torch.equal(restored.bank.features, method.bank.features)


def test_bad_cluster_counts_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"method\.pcl\.num_clusters=\(2, 64\) asks for more prototypes than the 32"):
        build_method("pcl", {**TINY, "num_clusters": [2, 64]})
    with pytest.raises(ValueError, match=r"num_clusters=\(\) must be a non-empty list"):
        build_method("pcl", {**TINY, "num_clusters": []})
    with pytest.raises(FieldValueError, match="num_clusters=.* asks for more prototypes than the 8 training"):
        build_method("pcl", {**TINY, "bank_size": 0, "num_clusters": [2, 16]}, train_rows=8)
