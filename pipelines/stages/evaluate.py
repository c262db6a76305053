"""Evaluate stage: weighted kNN and linear probe of the pretrained encoder on the test split, against a randomly
initialised encoder of the same architecture; a PCA plot of the test embeddings coloured by label.

Runs as one Ray task (no Train workers): features of the labeled train rows (the bank / probe training set) and
of the test rows are extracted once per encoder, on the task's device.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from pipelines import tracking
from pipelines.datasets import load_split_tensors
from pipelines.stages.pretrain import eval_normalizer
from ssl_core import augment
from ssl_core.backbones import build_backbone
from ssl_core.evaluate import extract_features, knn_accuracy, linear_probe


def _scores(encoder, cfg, bank, test, num_classes: int, normalize, device) -> tuple[dict[str, float], torch.Tensor]:
    e = cfg.evaluate
    bank_features = extract_features(encoder, bank[0], device=device, normalize=normalize)
    test_features = extract_features(encoder, test[0], device=device, normalize=normalize)
    knn = knn_accuracy(bank_features, bank[1], test_features, test[1], num_classes=num_classes, k=e.knn_k,
                       temperature=e.knn_temperature)
    probe = linear_probe(bank_features, bank[1], test_features, test[1], num_classes=num_classes,
                         epochs=e.linear_probe_epochs, lr=e.linear_probe_lr, device=device)
    return {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "linear_top1": probe["top1"]}, test_features


def _pca_plot(features: dict[str, torch.Tensor], labels: torch.Tensor, path: Path) -> None:
    """Two panels (one per encoder): the test embeddings projected on their first two principal components."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(features), figsize=(5 * len(features), 4.5))
    for axis, (name, values) in zip(axes, features.items()):
        centred = values - values.mean(dim=0)
        _, _, components = torch.pca_lowrank(centred, q=2, center=False)
        points = (centred @ components[:, :2]).numpy()
        scatter = axis.scatter(points[:, 0], points[:, 1], c=labels.numpy(), cmap="tab10", s=6)
        axis.set_title(f"{name} encoder: test embeddings (PCA)")
    figure.colorbar(scatter, ax=axes, label="label")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def evaluate_stage(cfg, run_id: str, upstream: dict[str, dict[str, Any]]) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = cfg.data.image_size
    num_classes = upstream["ingest"]["num_classes"]
    normalize = eval_normalizer(augment.preset(cfg.method.name, size))
    bank = load_split_tensors(cfg.data.path, "train", size, labeled_only=True)
    test = load_split_tensors(cfg.data.path, "test", size, labeled_only=True)

    pretrained = tracking.load_torch_model(cfg.tracking, upstream["pretrain"]["encoder_uri"]).to(device)
    torch.manual_seed(cfg.data.seed)
    method_config = cfg.method.config
    random_init = build_backbone(method_config["backbone"], small_images=method_config["small_images"],
                                 image_size=size).to(device)
    metrics: dict[str, float] = {}
    features: dict[str, torch.Tensor] = {}
    for name, encoder in (("ssl", pretrained), ("random", random_init)):
        scores, features[name] = _scores(encoder, cfg, bank, test, num_classes, normalize, device)
        metrics.update({f"{key}_{name}": value for key, value in scores.items()})
    tracking.log_metrics(cfg.tracking, run_id, [(0, metrics)])
    with tempfile.TemporaryDirectory() as directory:
        plot = Path(directory) / "test_embeddings_pca.png"
        _pca_plot(features, test[1], plot)
        plot_uri = tracking.log_artifact(cfg.tracking, run_id, plot, "plots")
    return {"metrics": metrics, "plot_uri": plot_uri}
