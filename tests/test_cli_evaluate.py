"""``sslflow evaluate``: an encoder logged to a real MLflow store, scored on an ``.npz`` whose only labels are its
test split (the split-half bank), no Ray. The pixel floor is checked against a naive weighted kNN written here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import nn

from pipelines import tracking
from pipelines.cli import main
from pipelines.config import TrackingConfig
from pipelines.scoring import STAGE, scoring_rows, untrained_copy
from ssl_core.augment import IMAGENET_MEAN, IMAGENET_STD


def class_images(count: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8x8 RGB images whose class sets the mean colour (so every floor is above chance), plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % classes
    base = np.array([[40, 200, 90], [220, 30, 60], [90, 90, 230], [200, 200, 20]], dtype=np.float64)[labels]
    images = base[:, None, None, :] + rng.normal(0, 40, size=(count, 8, 8, 3))
    return images.clip(0, 255).astype(np.uint8), labels


def naive_knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                   k: int, temperature: float, classes: int) -> float:
    """Weighted kNN, one query and one neighbour at a time: cosine similarity, k most similar, exp(sim/t) votes."""
    correct = 0
    for query, label in zip(queries.tolist(), query_labels.tolist()):
        sims = []
        for item, item_label in zip(bank.tolist(), bank_labels.tolist()):
            dot = sum(a * b for a, b in zip(query, item))
            norm = math.sqrt(sum(a * a for a in query)) * math.sqrt(sum(b * b for b in item))
            sims.append((dot / norm, item_label))
        votes = [0.0] * classes
        for sim, item_label in sorted(sims, key=lambda pair: -pair[0])[:k]:
            votes[item_label] += math.exp(sim / temperature)
        correct += int(max(range(classes), key=lambda c: votes[c]) == label)
    return correct / len(query_labels)


def test_evaluate_scores_an_encoder_against_floors_and_logs_them(tmp_path: Path, capsys) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tmp_path / "tracking.yaml"
    config.write_text(yaml.safe_dump({"tracking": {"uri": uri, "artifact_location": str(tmp_path / "artifacts")}}))
    tracking_config = TrackingConfig(uri=uri, artifact_location=str(tmp_path / "artifacts"))
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten())
    with tracking.run(tracking_config, "pretrain", params={"data.image_size": 8}) as run_id:
        model_uri = tracking.log_torch_model(tracking_config, run_id, encoder, "encoder", torch.zeros(2, 3, 8, 8))

    # What a new user has: unlabeled train images, labeled test images, under numpy.savez's usual names.
    x_train, _ = class_images(24, 4, seed=1)
    x_test, y_test = class_images(40, 4, seed=2)
    npz = tmp_path / "own.npz"
    np.savez(npz, x_train=x_train, x_test=x_test, y_test=y_test)

    code = main(["evaluate", model_uri, str(npz), "--knn-k", "5", "--knn-t", "0.1", "--probe-epochs", "20",
                 "--config", str(config)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "no labeled train/val rows: the 40 labeled test rows cut in two" in out
    table = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.splitlines()
             if line.split() and line.split()[0] in ("encoder", "untrained", "pixels")}
    assert set(table) == {"encoder", "untrained", "pixels"}

    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("sslflow").experiment_id],
                                         f"tags.`{tracking.STAGE_TAG}` = '{STAGE}'")
    assert len(runs) == 1
    logged = runs[0].data.metrics
    for name, (knn1, knn5, linear1) in table.items():
        assert logged[f"knn_top1_{name}"] == pytest.approx(knn1, abs=1e-4)
        assert logged[f"knn_top5_{name}"] == pytest.approx(knn5, abs=1e-4)
        assert logged[f"linear_top1_{name}"] == pytest.approx(linear1, abs=1e-4)
        assert 0.0 <= knn1 <= knn5 <= 1.0
    assert runs[0].data.params["rows_mode"] == "split-half" and runs[0].data.params["image_size"] == "8"
    assert int(runs[0].data.params["bank_rows"]) + int(runs[0].data.params["query_rows"]) == 40

    # The pixel floor, recomputed naively on the same rows (ingest to an explicit folder: same seed, same rows).
    from pipelines.stages.ingest import ingest

    ingest(str(npz), tmp_path / "data", val_fraction=0.0)
    rows = scoring_rows(tmp_path / "data", "test", 8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def pixels(images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255 - mean) / std).flatten(1)

    expected = naive_knn_top1(pixels(rows.bank_images), rows.bank_labels, pixels(rows.query_images),
                              rows.query_labels, k=5, temperature=0.1, classes=4)
    assert logged["knn_top1_pixels"] == pytest.approx(expected, abs=1e-6)
    assert expected > 0.5  # colour classes: raw pixels are a real floor, well above chance (0.25)

    # Bad input: a clear message naming the flag, exit status 2.
    assert main(["evaluate", model_uri, str(npz), "--knn-k", "0", "--config", str(config)]) == 2
    assert "--knn-k=0 must be positive" in capsys.readouterr().err
    assert main(["evaluate", "runs:/0123/encoder", str(npz), "--config", str(config)]) == 2
    assert "records no data.image_size: give --image-size" in capsys.readouterr().err


def test_untrained_copy_reinitialises_every_layer_and_leaves_the_encoder() -> None:
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    with torch.no_grad():
        encoder[0].weight.fill_(0.5)
        encoder[1].running_mean.fill_(3.0)
    copy = untrained_copy(encoder, seed=0)
    assert torch.all(encoder[0].weight == 0.5) and torch.all(encoder[1].running_mean == 3.0)
    assert not torch.allclose(copy[0].weight, encoder[0].weight)
    assert torch.all(copy[1].running_mean == 0.0)
    assert torch.equal(untrained_copy(encoder, seed=0)[0].weight, copy[0].weight)  # seeded
