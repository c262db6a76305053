"""Label propagation over a kNN graph of frozen features (Zhou et al., 2004; Iscen et al., CVPR 2019).

Affinities ``a_ij = max(0, f_i . f_j)^gamma`` for the ``k`` nearest neighbours ``j`` of ``i`` (L2-normalised
features, self excluded), ``W = A + A^T``, ``S = D^-1/2 W D^-1/2``; the scores solve ``(I - alpha S) Z = Y``
(``Y`` one-hot on labeled rows, 0 elsewhere) by conjugate gradients, never forming an N x N matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_core.semi.losses import certainty_weights


@dataclass(frozen=True)
class KnnGraph:
    """Row ``i``'s neighbours ``indices[i]`` (rows, k) with affinities ``weights[i]`` (rows, k)."""

    indices: Tensor
    weights: Tensor

    def symmetric_normalised_product(self, values: Tensor) -> Tensor:
        """``S @ values`` with ``S = D^-1/2 (A + A^T) D^-1/2``. Shape: (rows, c) -> (rows, c)."""
        degree = self._degree()
        scaled = values / degree.sqrt().view(-1, 1)
        return (self._product(scaled) + self._transpose_product(scaled)) / degree.sqrt().view(-1, 1)

    def _product(self, values: Tensor) -> Tensor:  # A @ values
        return (self.weights.unsqueeze(2) * values[self.indices]).sum(dim=1)

    def _transpose_product(self, values: Tensor) -> Tensor:  # A^T @ values
        out = torch.zeros_like(values)
        contributions = self.weights.unsqueeze(2) * values.unsqueeze(1)  # (rows, k, c): a_ij v_i goes to row j
        out.index_add_(0, self.indices.flatten(), contributions.flatten(0, 1))
        return out

    def _degree(self) -> Tensor:
        ones = torch.ones(self.indices.shape[0], 1, dtype=self.weights.dtype, device=self.weights.device)
        return (self._product(ones) + self._transpose_product(ones)).squeeze(1).clamp(min=1e-12)


def knn_graph(features: Tensor, k: int, gamma: float, chunk_size: int = 1024) -> KnnGraph:
    """The kNN graph of the module docstring over ``features`` (rows, dim), in chunks of ``chunk_size`` rows."""
    if len(features) < 2:
        raise ValueError("label propagation needs at least 2 rows")
    k = min(k, len(features) - 1)
    normalised = F.normalize(features if features.is_floating_point() else features.float(), dim=1)
    indices, weights = [], []
    for start in range(0, len(normalised), chunk_size):
        similarity = normalised[start:start + chunk_size] @ normalised.T
        rows = torch.arange(start, start + len(similarity), device=features.device)
        similarity[torch.arange(len(similarity)), rows] = -float("inf")  # no self loops
        values, neighbours = similarity.topk(k, dim=1)
        indices.append(neighbours)
        weights.append(values.clamp(min=0.0).pow(gamma))
    return KnnGraph(torch.cat(indices), torch.cat(weights))


def propagate(graph: KnnGraph, labels: Tensor, num_classes: int, alpha: float, iterations: int) -> Tensor:
    """Scores ``Z`` solving ``(I - alpha S) Z = Y`` by ``iterations`` steps of conjugate gradients (one system per
    class column, run together). ``labels`` (rows,) int64 with -1 = unlabeled. Shape: -> (rows, num_classes)."""
    targets = torch.zeros(len(labels), num_classes, dtype=graph.weights.dtype, device=graph.weights.device)
    known = labels >= 0
    targets[known] = F.one_hot(labels[known], num_classes).to(targets.dtype)

    def operator(values: Tensor) -> Tensor:
        return values - alpha * graph.symmetric_normalised_product(values)

    scores = torch.zeros_like(targets)
    residual = targets - operator(scores)
    direction = residual.clone()
    residual_norm = (residual * residual).sum(dim=0)
    for _ in range(iterations):
        product = operator(direction)
        step = residual_norm / (direction * product).sum(dim=0).clamp(min=1e-30)
        scores = scores + step * direction
        residual = residual - step * product
        new_norm = (residual * residual).sum(dim=0)
        direction = residual + (new_norm / residual_norm.clamp(min=1e-30)) * direction
        residual_norm = new_norm
    return scores


def propagated_labels(features: Tensor, labels: Tensor, num_classes: int, *, k: int, alpha: float, gamma: float,
                      iterations: int) -> tuple[Tensor, Tensor]:
    """Pseudo-labels and their certainty weights for every row: ``argmax Z`` and ``1 - H(z_hat)/log C``; labeled rows
    keep their label with weight 1. Shape: -> (rows,) int64, (rows,) float."""
    scores = propagate(knn_graph(features, k, gamma), labels, num_classes, alpha, iterations)
    pseudo = scores.argmax(dim=1)
    weights = certainty_weights(scores)
    known = labels >= 0
    pseudo[known] = labels[known]
    weights[known] = 1.0
    return pseudo, weights
