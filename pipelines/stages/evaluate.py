"""Evaluate stage: weighted kNN and linear probe of the pretrained encoder on the test split, against a randomly
initialised encoder of the same method and architecture; a PCA plot of the test embeddings coloured by label.

Runs as one Ray task (no Train workers): features of the labeled train rows (the bank / probe training set) and
of the test rows are extracted once per encoder, on the task's device, normalised as the method's views are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pipelines import tracking
from pipelines.config import PipelineConfig
from pipelines.datasets import load_split_tensors, read_manifest
from pipelines.knn_monitor import pretrain_rows
from pipelines.records import EvaluateRecord, IngestRecord, PretrainRecord, StageRecord
from ssl_core.augment import Normalization
from ssl_core.evaluate import extract_features, knn_accuracy, linear_probe
from ssl_core.methods import build_method

Split = tuple[torch.Tensor, torch.Tensor]


def _scores(encoder: torch.nn.Module, cfg: PipelineConfig, bank: Split, test: Split, num_classes: int,
            normalization: Normalization, device: torch.device) -> tuple[dict[str, float], torch.Tensor]:
    e = cfg.evaluate
    bank_features = extract_features(encoder, bank[0], device=device, normalize=normalization)
    test_features = extract_features(encoder, test[0], device=device, normalize=normalization)
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


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> EvaluateRecord:
    """Metrics ``{knn_top1, knn_top5, linear_top1}_{ssl, random}``."""
    ingest: IngestRecord = inputs["ingest"]
    pretrain: PretrainRecord = inputs["pretrain"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = cfg.data.image_size
    bank = load_split_tensors(cfg.data.path, "train", size, labeled_only=True)
    test = load_split_tensors(cfg.data.path, "test", size, labeled_only=True)
    pretrained = tracking.load_torch_model(cfg.tracking, pretrain.encoder_uri).to(device)
    torch.manual_seed(cfg.data.seed)
    method = build_method(cfg.method.name, cfg.method.config, train_rows=pretrain_rows(read_manifest(cfg.data.path)))
    normalization = method.normalization()
    metrics: dict[str, float] = {}
    features: dict[str, torch.Tensor] = {}
    for name, encoder in (("ssl", pretrained), ("random", method.encoder.to(device))):
        scores, features[name] = _scores(encoder, cfg, bank, test, ingest.num_classes, normalization, device)
        metrics.update({f"{key}_{name}": value for key, value in scores.items()})
    tracking.log_metrics(cfg.tracking, run_id, [(0, metrics)])
    with tempfile.TemporaryDirectory() as directory:
        plot = Path(directory) / "test_embeddings_pca.png"
        _pca_plot(features, test[1], plot)
        plot_uri = tracking.log_artifact(cfg.tracking, run_id, plot, "plots")
    return EvaluateRecord(metrics=metrics, plot_uri=plot_uri)
