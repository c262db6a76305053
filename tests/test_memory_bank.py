"""The memory bank of NPID / Exemplar / PIRL / PCL: its update against a naive loop, copies, sampling, bad input,
a checkpoint round trip, and how a method config learns the training set size."""

from __future__ import annotations

import io
import math

import pytest
import torch

from ssl_core.hparams import FieldValueError
from ssl_core.memory_bank import MemoryBank, bank_megabytes, check_bank_size, sized_bank_config
from ssl_core.methods import build_method, method_config


def _normalized(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


def test_update_is_the_momentum_average_renormalised_row_by_row() -> None:
    torch.manual_seed(0)
    bank = MemoryBank(6, 3, gather_distributed=False)
    before = bank.features.clone()
    rows = torch.tensor([4, 1])
    features = torch.randn(2, 3)
    bank.update(rows, features, momentum=0.25)
    for r in range(6):
        if r in (4, 1):
            feature = _normalized(features[[4, 1].index(r)].tolist())
            mixed = [0.25 * old + 0.75 * new for old, new in zip(before[r].tolist(), feature)]
            assert bank.features[r].tolist() == pytest.approx(_normalized(mixed), abs=1e-6)
        else:
            assert torch.equal(bank.features[r], before[r])
    bank.update(torch.tensor([0]), torch.tensor([[0.0, 3.0, 4.0]]), momentum=0.0)  # 0: overwrite
    assert bank.features[0].tolist() == pytest.approx([0.0, 0.6, 0.8])


def test_rows_are_copies_and_sampling_stays_in_range() -> None:
    bank = MemoryBank(5, 2, gather_distributed=False)
    copy = bank.rows(torch.tensor([2, 2]))
    copy.zero_()
    assert bank.features[2].norm() == pytest.approx(1.0)
    drawn = bank.sample_rows((1000,), torch.Generator().manual_seed(0))
    assert drawn.min() >= 0 and drawn.max() < 5 and len(drawn.unique()) == 5


def test_bad_rows_and_features_raise() -> None:
    bank = MemoryBank(4, 2, gather_distributed=False)
    with pytest.raises(IndexError, match=r"row indices must be in \[0, 4\), got \[0, 4\]: is bank_size"):
        bank.update(torch.tensor([0, 4]), torch.randn(2, 2), momentum=0.5)
    with pytest.raises(ValueError, match=r"features must have shape \(2, 2\)"):
        bank.update(torch.tensor([0, 1]), torch.randn(2, 3), momentum=0.5)
    with pytest.raises(ValueError, match="rows must be a 1-D int64"):
        bank.rows(torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"momentum=1.0 must be in \[0, 1\)"):
        bank.update(torch.tensor([0]), torch.randn(1, 2), momentum=1.0)
    with pytest.raises(ValueError, match="size=0 must be positive"):
        MemoryBank(0, 2)


def test_bank_survives_a_checkpoint_round_trip() -> None:
    method = build_method("npid", {"backbone": "resnet8", "image_size": 16, "bank_size": 10, "embedding_dim": 8})
    method.bank.update(torch.arange(3), torch.randn(3, 8), momentum=0.0)
    method.normalizer.fill_(123.0)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = build_method("npid", {"backbone": "resnet8", "image_size": 16, "bank_size": 10, "embedding_dim": 8})
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.bank.features, method.bank.features) and float(restored.normalizer) == 123.0


def test_memory_cost_and_bank_size_rules() -> None:
    assert bank_megabytes(60_000, 128) == pytest.approx(30.72)
    with pytest.raises(FieldValueError, match="bank_size=0 must be the number of training images: method 'npid'"):
        check_bank_size("npid", 0)
    with pytest.raises(FieldValueError, match="bank_size=0 must be the number of training images"):
        build_method("npid", {"image_size": 16})
    config = method_config("npid", {"image_size": 16})
    assert sized_bank_config(config, 50).bank_size == 50 and config.for_train_rows(50).bank_size == 50
    with pytest.raises(FieldValueError, match="bank_size=40 does not match the 50 training rows"):
        method_config("npid", {"bank_size": 40}).for_train_rows(50)
    assert build_method("npid", {"image_size": 16, "backbone": "resnet8"}, train_rows=7).bank.size == 7
    assert method_config("simclr").for_train_rows(7) == method_config("simclr")  # no bank: unchanged
