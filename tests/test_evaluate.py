import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_core.evaluate import extract_features, knn_accuracy, knn_predict, linear_probe


def naive_knn_scores(train_features, train_labels, test_features, num_classes, k, temperature):
    """Loop reference: cosine similarity to every training point, sort, sum exp(sim / T) per class."""
    scores = torch.zeros(len(test_features), num_classes)
    for j, query in enumerate(test_features):
        sims = []
        for i, key in enumerate(train_features):
            cosine = float(query @ key) / (float(query.norm()) * float(key.norm()))
            sims.append((cosine, i))
        sims.sort(reverse=True)
        for cosine, i in sims[:k]:
            scores[j, int(train_labels[i])] += math.exp(cosine / temperature)
    return scores


def clustered(num_per_class: int, num_classes: int, dim: int, noise: float, generator: torch.Generator):
    centers = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1) * 5
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    features = centers[labels] + noise * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_knn_predict_matches_naive_loop():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(12, 4, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    test = torch.randn(5, 4, generator=generator)
    scores = knn_predict(train, labels, test, num_classes=3, k=4, temperature=0.5, batch_size=2)
    expected = naive_knn_scores(train, labels, test, num_classes=3, k=4, temperature=0.5)
    torch.testing.assert_close(scores, expected)
    # chunking does not change the result
    torch.testing.assert_close(knn_predict(train, labels, test, num_classes=3, k=4, temperature=0.5), scores)


def test_knn_perfect_clusters():
    generator = torch.Generator().manual_seed(1)
    train, train_labels = clustered(20, 10, 16, 0.1, generator)
    test, test_labels = clustered(5, 10, 16, 0.1, torch.Generator().manual_seed(1))
    result = knn_accuracy(train, train_labels, test, test_labels, num_classes=10, k=20)
    assert result == {"top1": 1.0, "top5": 1.0}


def test_knn_random_labels_near_chance():
    generator = torch.Generator().manual_seed(2)
    train = torch.randn(2000, 32, generator=generator)
    train_labels = torch.randint(0, 10, (2000,), generator=generator)
    test = torch.randn(2000, 32, generator=generator)
    test_labels = torch.randint(0, 10, (2000,), generator=generator)
    result = knn_accuracy(train, train_labels, test, test_labels, num_classes=10, k=20, batch_size=256)
    assert abs(result["top1"] - 0.1) < 0.03
    assert abs(result["top5"] - 0.5) < 0.05


def test_knn_k_larger_than_train_set_and_bad_inputs():
    train = torch.eye(3)
    scores = knn_predict(train, torch.tensor([0, 1, 1]), torch.eye(3), num_classes=2, k=50)
    assert scores.shape == (3, 2)
    with pytest.raises(ValueError, match="dims"):
        knn_predict(train, torch.tensor([0, 1, 1]), torch.randn(2, 4), num_classes=2)
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(train, torch.tensor([0, 1, 5]), train, num_classes=2)


def test_linear_probe_separable_data():
    generator = torch.Generator().manual_seed(3)
    train, train_labels = clustered(50, 5, 8, 1.0, generator)
    test, test_labels = clustered(20, 5, 8, 1.0, torch.Generator().manual_seed(3))
    # shift and scale the features: standardisation must undo it
    train, test = train * 100 + 7, test * 100 + 7
    result = linear_probe(train, train_labels, test, test_labels, num_classes=5, epochs=30, batch_size=64)
    assert set(result) == {"top1"}
    assert result["top1"] > 0.95


def test_linear_probe_random_labels_near_chance_and_deterministic():
    generator = torch.Generator().manual_seed(4)
    train = torch.randn(1000, 16, generator=generator)
    train_labels = torch.randint(0, 10, (1000,), generator=generator)
    test = torch.randn(2000, 16, generator=generator)
    test_labels = torch.randint(0, 10, (2000,), generator=generator)
    kwargs = {"num_classes": 10, "epochs": 10, "batch_size": 128, "seed": 7}
    first = linear_probe(train, train_labels, test, test_labels, **kwargs)
    assert abs(first["top1"] - 0.1) < 0.03
    assert linear_probe(train, train_labels, test, test_labels, **kwargs) == first
    full_batch = linear_probe(train, train_labels, test, test_labels, num_classes=10, epochs=5, batch_size=None)
    assert 0.0 <= full_batch["top1"] <= 1.0


def test_extract_features_shape_dtype_and_mode():
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    encoder.train()
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    running_mean = encoder[1].running_mean.clone()
    features = extract_features(encoder, images, batch_size=4)
    assert features.shape == (10, 4) and features.dtype == torch.float32
    assert encoder.training
    assert torch.equal(encoder[1].running_mean, running_mean)  # eval mode: BN stats untouched
    # uint8 is scaled to [0, 1]; normalize is applied after
    floats = images.float() / 255
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(features, encoder(floats))
        torch.testing.assert_close(
            extract_features(encoder, floats, normalize=lambda x: (x - 0.5) / 0.25), encoder((floats - 0.5) / 0.25)
        )
    assert not encoder.training  # eval mode is restored too
    # an iterable of batches works like a tensor
    torch.testing.assert_close(extract_features(encoder, list(images.split(3))), features)
    with pytest.raises(ValueError, match="shape"):
        extract_features(encoder, torch.zeros(2, 8, 8))
