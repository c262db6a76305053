"""``sslflow evaluate``: score any encoder on one's own labeled split, without the pipeline and without Ray.

``score_encoder(encoder, data_path, ...)`` reads an ingest output (``pipelines.datasets.load_split_tensors``) and
reports, for three feature extractors, weighted kNN top-1/top-5 and linear-probe top-1 (``ssl_core.evaluate``):

- ``encoder``: the given encoder;
- ``untrained``: the same architecture with every parameter re-initialised (``reset_parameters`` of each module,
  seeded), the floor any training must beat;
- ``pixels``: the normalised pixels themselves, flattened, the floor any encoder must beat.

Which rows (``scoring_rows``): queries are the labeled rows of ``split``; the bank (kNN neighbours, linear-probe
training set) is the labeled rows of the other non-test splits (``train``, ``val``) when there are any
(``mode = "bank"``); otherwise the labeled rows of ``split`` itself are cut in two, a seeded class-stratified half
as queries and the rest as bank (``mode = "split-half"``), so that a dataset whose only labels are its test split
can still be scored. Images are scaled to [0, 1] and normalised with ImageNet's mean/std, what the views of every
sslflow method end with.

``evaluate_model(...)`` is the command: the encoder from an MLflow model URI, the image size from the run that
logged it (``data.image_size``) unless given, the scores printed and logged to a run tagged
``sslflow.stage = evaluate-cli``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipelines.datasets import MANIFEST_NAME, load_split_tensors, read_manifest, stratified_subset
from ssl_core.augment import IMAGENET_MEAN, IMAGENET_STD, Normalization
from ssl_core.classifier import top1_accuracy
from ssl_core.evaluate import extract_features, knn_accuracy, linear_probe

STAGE = "evaluate-cli"
FEATURES = ("encoder", "untrained", "pixels")
_HALF_STREAM = 30  # random stream of the split-half draw (see datasets.stratified_subset)


@dataclass(frozen=True)
class ScoringRows:
    """Labeled images and labels of the bank and of the queries, and how they were chosen."""

    bank_images: torch.Tensor
    bank_labels: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor
    mode: str
    """``bank`` (bank from the other non-test splits) or ``split-half`` (both from ``split``)."""
    description: str


def scoring_rows(data_path: str | Path, split: str, image_size: int, seed: int = 0) -> ScoringRows:
    """The bank and the queries of ``split`` (see the module docstring); ``ValueError`` if ``split`` has no labeled
    rows or too few to cut in two."""
    splits = read_manifest(data_path)["splits"]
    if split not in splits:
        raise ValueError(f"split {split!r} is not in {data_path}; splits: {', '.join(splits)}")
    if splits[split]["labeled"] == 0:
        raise ValueError(f"split {split!r} of {data_path} has no labeled rows to score on")
    bank_splits = [name for name in ("train", "val") if name != split and splits.get(name, {}).get("labeled", 0) > 0]
    images, labels = load_split_tensors(data_path, split, image_size, labeled_only=True)
    if bank_splits:
        bank_images, bank_labels = load_split_tensors(data_path, bank_splits, image_size, labeled_only=True)
        return ScoringRows(bank_images, bank_labels, images, labels, "bank",
                           f"queries = the {len(labels)} labeled {split} rows, bank = the {len(bank_labels)} labeled "
                           f"{' + '.join(bank_splits)} rows")
    queries = stratified_subset(list(range(len(labels))), labels.tolist(), 0.5, seed=seed, stream=_HALF_STREAM,
                                leave_one_out=True)
    if not queries:
        raise ValueError(f"split {split!r} of {data_path}: {len(labels)} labeled rows and no labeled train/val rows; "
                         "too few to cut into a bank and queries")
    is_query = torch.zeros(len(labels), dtype=torch.bool)
    is_query[queries] = True
    return ScoringRows(images[~is_query], labels[~is_query], images[is_query], labels[is_query], "split-half",
                       f"no labeled train/val rows: the {len(labels)} labeled {split} rows cut in two (stratified, "
                       f"seed {seed}): queries = {int(is_query.sum())}, bank = {int((~is_query).sum())}")


def labeled_split_top1(data_path: str | Path, split: str, image_size: int, device: torch.device,
                       *classifiers: nn.Module) -> list[float] | None:
    """Top-1 of each of ``classifiers`` on the labeled rows of ``split`` (decoded once), or None when the split has
    no labeled rows (the pipeline scores ``val``, what promotion gates on, beside ``test``, what it reports)."""
    if read_manifest(data_path)["splits"].get(split, {}).get("labeled", 0) == 0:
        return None
    images, labels = load_split_tensors(data_path, split, image_size, labeled_only=True)
    return [top1_accuracy(classifier, images, labels, device) for classifier in classifiers]


def untrained_copy(encoder: nn.Module, seed: int) -> nn.Module:
    """A copy of ``encoder`` whose every submodule with ``reset_parameters`` is re-initialised (seeded); batch-norm
    running statistics are reset with it."""
    untrained = copy.deepcopy(encoder)
    torch.manual_seed(seed)
    for module in untrained.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return untrained


class _Flatten(nn.Module):
    """Pixels as features: (N, C, H, W) -> (N, C * H * W)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


def score_encoder(encoder: nn.Module, rows: ScoringRows, *, knn_k: int = 200, knn_temperature: float = 0.1,
                  probe_epochs: int = 100, probe_lr: float = 0.01, seed: int = 0,
                  device: torch.device | None = None) -> dict[str, float]:
    """``{knn_top1, knn_top5, linear_top1}_{encoder, untrained, pixels}`` on ``rows`` (accuracies in [0, 1]).
    ``knn_k`` is capped at the bank size."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    normalization = Normalization(IMAGENET_MEAN, IMAGENET_STD)
    num_classes = int(torch.cat([rows.bank_labels, rows.query_labels]).max()) + 1
    extractors = {"encoder": encoder, "untrained": untrained_copy(encoder, seed), "pixels": _Flatten()}
    scores: dict[str, float] = {}
    for name, extractor in extractors.items():
        extractor = extractor.to(device)
        bank = extract_features(extractor, rows.bank_images, device=device, normalize=normalization)
        queries = extract_features(extractor, rows.query_images, device=device, normalize=normalization)
        knn = knn_accuracy(bank, rows.bank_labels, queries, rows.query_labels, num_classes=num_classes,
                           k=min(knn_k, len(rows.bank_labels)), temperature=knn_temperature)
        probe = linear_probe(bank, rows.bank_labels, queries, rows.query_labels, num_classes=num_classes,
                             epochs=probe_epochs, lr=probe_lr, device=device, seed=seed)
        scores.update({f"knn_top1_{name}": knn["top1"], f"knn_top5_{name}": knn["top5"],
                       f"linear_top1_{name}": probe["top1"]})
    return scores


def scores_table(scores: dict[str, float]) -> str:
    """The scores as a table: one row per feature extractor, one column per metric."""
    lines = [f"{'features':<10} {'knn_top1':>9} {'knn_top5':>9} {'linear_top1':>12}"]
    for name in FEATURES:
        lines.append(f"{name:<10} {scores[f'knn_top1_{name}']:>9.4f} {scores[f'knn_top5_{name}']:>9.4f} "
                     f"{scores[f'linear_top1_{name}']:>12.4f}")
    return "\n".join(lines)


def logged_image_size(tracking_config, model_uri: str) -> int | None:
    """``data.image_size`` of the MLflow run that logged ``model_uri``, if that run recorded it."""
    import mlflow

    from pipelines import tracking

    client = tracking.client_for(tracking_config)
    try:
        run_id = mlflow.models.get_model_info(model_uri).run_id
    except Exception:  # noqa: BLE001 - a URI MLflow cannot describe: the caller asks for --image-size
        return None
    value = client.get_run(run_id).data.params.get("data.image_size") if run_id else None
    return int(value) if value is not None else None


def evaluate_model(tracking_config, model_uri: str, data: str, *, split: str = "test", knn_k: int = 200,
                   knn_temperature: float = 0.1, image_size: int | None = None, probe_epochs: int = 100,
                   seed: int = 0, npz_keys: dict[str, str] | None = None) -> tuple[str, dict[str, float], ScoringRows]:
    """Score the encoder at ``model_uri`` on ``data`` (an ingest output folder, or any ``sslflow ingest`` source,
    ingested to a temporary folder with no val split), log the scores to a new MLflow run; returns ``(run id,
    scores, rows)``."""
    import tempfile

    from pipelines import tracking
    from pipelines.stages.ingest import ingest

    for flag, value in (("--knn-k", knn_k), ("--knn-t", knn_temperature), ("--probe-epochs", probe_epochs),
                        ("--image-size", image_size or 1)):
        if value <= 0:
            raise ValueError(f"{flag}={value} must be positive")
    if image_size is None:
        image_size = logged_image_size(tracking_config, model_uri)
        if image_size is None:
            raise ValueError(f"the run that logged {model_uri} records no data.image_size: give --image-size")
    from pipelines.serving.models import load_torch_module

    encoder = load_torch_module(tracking_config, model_uri)  # a run's PyTorch model or a registered one
    with tempfile.TemporaryDirectory() as directory:
        data_path = Path(data)
        if not (data_path / MANIFEST_NAME).is_file():
            data_path = Path(directory) / "data"
            ingest(data, data_path, val_fraction=0.0, seed=seed, npz_keys=npz_keys)
        rows = scoring_rows(data_path, split, image_size, seed)
        scores = score_encoder(encoder, rows, knn_k=knn_k, knn_temperature=knn_temperature,
                               probe_epochs=probe_epochs, seed=seed)
    params = {"model_uri": model_uri, "data": data, "split": split, "knn_k": knn_k, "knn_temperature": knn_temperature,
              "image_size": image_size, "linear_probe_epochs": probe_epochs, "seed": seed, "rows_mode": rows.mode,
              "bank_rows": len(rows.bank_labels), "query_rows": len(rows.query_labels)}
    with tracking.run(tracking_config, STAGE, {tracking.STAGE_TAG: STAGE, "sslflow.rows": rows.description},
                      params=params) as run_id:
        tracking.log_metrics(tracking_config, run_id, [(0, scores)])
    return run_id, scores, rows
