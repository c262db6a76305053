"""NPID: its tiny config, NCE against a naive loop, one step against a naive reference (NCE + proximal term +
bank update), the normaliser held fixed, the missing row index, and the row index through the Parquet reader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.datasets import load_split_tensors, read_manifest, read_split
from pipelines.stages.ingest import ingest
from ssl_core.losses import NCELoss
from ssl_core.methods import build_method
from ssl_core.methods.base import ROW_INDEX

TINY = {"image_size": 16, "embedding_dim": 16, "bank_size": 32, "num_negatives": 16}


def naive_nce(positive: list[float], negatives: list[list[float]], temperature: float, z: float, n: int) -> float:
    """Wu et al. 2018 eq. (6)-(7), one term at a time."""
    noise = len(negatives[0]) / n
    total = 0.0
    for b, s_pos in enumerate(positive):
        p = math.exp(s_pos / temperature) / z
        total -= math.log(p / (p + noise))
        for s_neg in negatives[b]:
            p = math.exp(s_neg / temperature) / z
            total -= math.log(1 - p / (p + noise))
    return total / len(positive)


def test_nce_loss_matches_naive_loop_and_rejects_bad_shapes() -> None:
    generator = torch.Generator().manual_seed(0)
    positive = torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1
    negatives = torch.rand(3, 5, generator=generator, dtype=torch.float64) * 2 - 1
    criterion = NCELoss(temperature=0.1)
    z = criterion.estimate_normalizer(positive, negatives, 100)
    all_scores = positive.tolist() + [s for row in negatives.tolist() for s in row]
    assert float(z) == pytest.approx(100 * sum(math.exp(s / 0.1) for s in all_scores) / len(all_scores), rel=1e-5)
    loss = criterion(positive, negatives, z, 100)
    assert float(loss) == pytest.approx(naive_nce(positive.tolist(), negatives.tolist(), 0.1, float(z), 100), rel=1e-5)
    with pytest.raises(ValueError, match=r"negatives must have shape \(3, K\)"):
        criterion(positive, negatives[:2], z, 100)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        NCELoss(temperature=0.0)


def _views(method, rows: list[int]) -> dict[str, torch.Tensor]:
    images = torch.randint(0, 256, (len(rows), 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    return {**method.view_generator()(images, torch.Generator().manual_seed(4)), ROW_INDEX: torch.tensor(rows)}


def test_step_matches_naive_reference_and_updates_the_bank() -> None:
    torch.manual_seed(0)
    method = build_method("npid", {**TINY, "backbone": "resnet8", "proximal_weight": 3.0})
    views = _views(method, [5, 9, 0, 31])
    bank_before = method.bank.features.clone()
    with torch.no_grad():
        features = F.normalize(method.embedding(method.encoder(views["view1"])), dim=1)
    torch.manual_seed(7)
    negative_rows = torch.randint(0, 32, (16,)).tolist()
    torch.manual_seed(7)
    out = method.training_step(views)

    rows = [5, 9, 0, 31]
    positive = [float(features[b] @ bank_before[r]) for b, r in enumerate(rows)]
    negatives = [[float(features[b] @ bank_before[j]) for j in negative_rows] for b in range(4)]
    all_scores = positive + [s for row in negatives for s in row]
    z = 32 * sum(math.exp(s / 0.07) for s in all_scores) / len(all_scores)
    proximal = sum(float((features[b] - bank_before[r]).pow(2).sum()) for b, r in enumerate(rows)) / 4
    expected = naive_nce(positive, negatives, 0.07, z, 32) + 3.0 * proximal
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-4)
    assert float(method.normalizer) == pytest.approx(z, rel=1e-4)
    for b, r in enumerate(rows):
        torch.testing.assert_close(method.bank.features[r], F.normalize(0.5 * bank_before[r] + 0.5 * features[b], dim=0))
    untouched = [r for r in range(32) if r not in rows]
    assert torch.equal(method.bank.features[untouched], bank_before[untouched])

    method.training_step(_views(method, [1, 2, 3, 4]))  # Z is estimated once, then held
    assert float(method.normalizer) == pytest.approx(z, rel=1e-4)


def test_a_step_without_row_index_names_what_is_missing() -> None:
    method = build_method("npid", {**TINY, "backbone": "resnet8"})
    views = _views(method, [0, 1])
    del views[ROW_INDEX]
    with pytest.raises(KeyError, match="method 'npid' needs views\\['row_index'\\]"):
        method.training_step(views)


def test_parquet_reader_numbers_every_train_row_once(ray_session, tmp_path) -> None:
    out = tmp_path / "digits"
    ingest("builtin:digits", out, label_fraction=0.5, seed=0)
    rows = read_manifest(out)["splits"]["train"]["rows"]
    batches = list(read_split(out, "train", image_size=8).iter_batches(batch_size=4096, batch_format="numpy"))
    index = np.concatenate([b[ROW_INDEX] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert index.dtype == np.int64 and sorted(index.tolist()) == list(range(rows))
    all_images, _ = load_split_tensors(out, "train", 8, labeled_only=False)  # shard order = row_index order
    assert np.array_equal(all_images.numpy()[index], images)
    labeled = np.concatenate([b[ROW_INDEX] for b in read_split(out, "train", image_size=8, labeled_only=True)
                              .iter_batches(batch_size=4096, batch_format="numpy")])
    assert len(labeled) < rows and set(labeled.tolist()) <= set(range(rows))  # numbers kept, not renumbered
    splits = read_manifest(out)["splits"]  # pretraining reads train and val: one numbering over both
    both = np.concatenate([b[ROW_INDEX] for b in read_split(out, ["train", "val"], image_size=8)
                           .iter_batches(batch_size=4096, batch_format="numpy")])
    assert sorted(both.tolist()) == list(range(splits["train"]["rows"] + splits["val"]["rows"]))
