"""ssl_core.semi: VAT's power iteration against the Hessian's top eigenvector computed by hand on a linear model,
and label propagation's kNN graph and linear solve against dense references built with loops."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_core.semi.propagation import knn_graph, propagate, propagated_labels
from ssl_core.semi.vat import adversarial_direction, kl_from_logits


def test_vat_direction_is_the_top_eigenvector_of_the_kl_hessian_of_a_linear_model() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    inputs = torch.randn(3, 6, generator=generator, dtype=torch.float64)

    def model(x: torch.Tensor) -> torch.Tensor:
        return x @ weight.T

    clean = model(inputs)
    direction = adversarial_direction(model, inputs, clean, xi=1e-4, power_iterations=30,
                                      generator=torch.Generator().manual_seed(1))
    for row in range(3):
        # KL(p || softmax(W(x + r))) ~ 1/2 r^T H r with H = W^T (diag(p) - p p^T) W (the softmax Fisher).
        p = torch.softmax(clean[row], 0)
        fisher = torch.zeros(4, 4, dtype=torch.float64)
        for i in range(4):
            for j in range(4):
                fisher[i, j] = (p[i] if i == j else 0.0) - p[i] * p[j]
        hessian = weight.T @ fisher @ weight
        _, vectors = torch.linalg.eigh(hessian)
        top = vectors[:, -1]
        assert direction[row].norm().item() == pytest.approx(1.0)
        assert abs(torch.dot(direction[row], top).item()) == pytest.approx(1.0, abs=1e-5)


def test_vat_divergence_is_zero_without_perturbation_and_detaches_its_target() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    assert kl_from_logits(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(4, 3, requires_grad=True)
    kl_from_logits(logits, other).backward()
    assert logits.grad is None and other.grad is not None


def _dense_normalised_affinity(features: torch.Tensor, k: int, gamma: float) -> torch.Tensor:
    """S = D^-1/2 (A + A^T) D^-1/2 with A from each row's k most similar other rows, by loops."""
    rows = len(features)
    unit = [f / f.norm() for f in features.double()]
    affinity = torch.zeros(rows, rows, dtype=torch.float64)
    for i in range(rows):
        similarities = sorted(((float(unit[i] @ unit[j]), j) for j in range(rows) if j != i), reverse=True)
        for value, j in similarities[:k]:
            affinity[i, j] = max(0.0, value) ** gamma
    symmetric = affinity + affinity.T
    degree = symmetric.sum(1)
    return symmetric / torch.sqrt(degree[:, None] * degree[None, :])


def test_knn_graph_and_propagation_match_the_dense_closed_form() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(14, 5, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, -1, 1, -1, -1, 2, -1, -1, -1, 0, -1, -1, 1, -1])
    k, gamma, alpha = 4, 3.0, 0.9
    graph = knn_graph(features, k, gamma, chunk_size=5)
    dense = _dense_normalised_affinity(features, k, gamma)
    values = torch.randn(14, 3, generator=generator, dtype=torch.float64)
    assert torch.allclose(graph.symmetric_normalised_product(values), dense @ values)
    targets = torch.zeros(14, 3, dtype=torch.float64)
    for row, label in enumerate(labels.tolist()):
        if label >= 0:
            targets[row, label] = 1.0
    expected = torch.linalg.solve(torch.eye(14, dtype=torch.float64) - alpha * dense, targets)
    scores = propagate(graph, labels, 3, alpha, iterations=14)  # CG is exact after n steps
    assert torch.allclose(scores, expected, atol=1e-8)


def test_propagated_labels_follow_the_clusters_and_keep_the_given_labels() -> None:
    generator = torch.Generator().manual_seed(2)
    centres = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    truth = torch.arange(3).repeat_interleave(10)
    features = centres[truth] + 0.5 * torch.randn(30, 3, generator=generator)
    labels = torch.full((30,), -1)
    labels[[0, 1, 2, 10, 20]] = torch.tensor([0, 0, 0, 1, 2])
    labels[5] = 2  # a wrong label, outnumbered in its cluster, is kept for its own row
    pseudo, weights = propagated_labels(features, labels, 3, k=5, alpha=0.99, gamma=3.0, iterations=50)
    unlabeled = labels < 0
    assert (pseudo[unlabeled] == truth[unlabeled]).float().mean() >= 0.9
    assert pseudo[5] == 2 and weights[[0, 5, 10, 20]].tolist() == [1.0] * 4
    assert pseudo[6] == 0  # its neighbours follow the majority
    assert ((weights >= 0) & (weights <= 1)).all()
    with pytest.raises(ValueError, match="at least 2 rows"):
        knn_graph(torch.randn(1, 3), 2, 3.0)
    assert math.isfinite(float(weights.sum()))
