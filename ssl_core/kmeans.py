"""k-means of a memory bank into prototypes, and PCL's per-prototype concentration (plain PyTorch, seeded).

``kmeans``: Lloyd's algorithm with Euclidean distance, ``iterations`` rounds from ``num_clusters`` distinct rows
drawn by ``generator``; an empty cluster keeps its previous centroid. Distances are computed in chunks of
``CHUNK_ROWS`` rows so a large bank never materialises an ``N x K`` matrix at once. Deterministic given the
generator, so every DDP rank clustering the same bank with the same seed gets the same prototypes.

``concentration`` (Li et al. 2021, "Prototypical Contrastive Learning", eq. 12 and their code): for cluster ``j``
with members ``z`` (``Z_j`` of them) and mean ``c_j``::

    phi_j = sum_z ||v_z - c_j||_2 / (Z_j log(Z_j + alpha))          (alpha = 10)

clusters with at most one member get the largest ``phi``; then ``phi`` is clipped to its 10th..90th percentile
and scaled so its mean is ``temperature`` (a loose cluster gets a higher temperature, a tight one a lower).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ROWS = 16384


def nearest_centroid(features: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """``(assignments (N,) long, squared distances (N,))`` of each row to its nearest centroid."""
    assignments, distances = [], []
    centroid_norms = centroids.pow(2).sum(dim=1)
    for chunk in features.split(CHUNK_ROWS):
        squared = chunk.pow(2).sum(dim=1, keepdim=True) - 2 * chunk @ centroids.T + centroid_norms
        best, index = squared.min(dim=1)
        assignments.append(index)
        distances.append(best.clamp_min(0))
    return torch.cat(assignments), torch.cat(distances)


@torch.no_grad()
def kmeans(features: Tensor, num_clusters: int, iterations: int = 10,
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(centroids (K, dim), assignments (N,) long)``: Lloyd's k-means of the rows of ``features`` (N, dim)."""
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, dim), got {tuple(features.shape)}")
    if not 1 <= num_clusters <= features.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} must be in [1, {features.shape[0]}] (the rows to cluster)")
    if iterations < 1:
        raise ValueError(f"iterations={iterations} must be >= 1")
    features = features.float()
    start = torch.randperm(features.shape[0], generator=generator)[:num_clusters].to(features.device)
    centroids = features[start].clone()
    for _ in range(iterations):
        assignments, _ = nearest_centroid(features, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, features)
        counts = torch.bincount(assignments, minlength=num_clusters).to(features.dtype)
        filled = counts > 0
        centroids = torch.where(filled.unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1), centroids)
    assignments, _ = nearest_centroid(features, centroids)
    return centroids, assignments


@torch.no_grad()
def concentration(features: Tensor, centroids: Tensor, assignments: Tensor, temperature: float,
                  alpha: float = 10.0) -> Tensor:
    """PCL's concentration ``phi`` of each of the ``K`` clusters (see the module docstring). Shape: (K,)."""
    num_clusters = centroids.shape[0]
    distances = (features.float() - centroids[assignments]).norm(dim=1)
    counts = torch.bincount(assignments, minlength=num_clusters).to(features.dtype)
    distance_sums = torch.zeros(num_clusters, dtype=features.dtype, device=features.device)
    distance_sums.index_add_(0, assignments, distances)
    several = counts > 1
    phi = distance_sums / (counts.clamp_min(1) * torch.log(counts + alpha))
    if several.any():
        phi = torch.where(several, phi, phi[several].max())
    else:  # every cluster a singleton: no spread to measure, every prototype gets the base temperature
        return torch.full((num_clusters,), temperature, dtype=features.dtype, device=features.device)
    low, high = torch.quantile(phi, torch.tensor([0.1, 0.9], dtype=phi.dtype, device=phi.device))
    phi = phi.clamp(low, high)
    return temperature * phi / phi.mean() if float(phi.mean()) > 0 else torch.full_like(phi, temperature)
