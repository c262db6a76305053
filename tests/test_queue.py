import pytest
import torch

from ssl_core.queue import NegativeQueue


def test_initial_keys_are_unit_vectors():
    queue = NegativeQueue(size=16, dim=4)
    assert queue.keys.shape == (16, 4)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(16))
    assert queue.ptr.dtype == torch.long and int(queue.ptr) == 0


def test_fifo_with_wraparound():
    queue = NegativeQueue(size=5, dim=2)
    initial = queue.keys.clone()
    first = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    second = torch.tensor([[4.0, 0.0], [5.0, 0.0], [6.0, 0.0]])
    queue.enqueue(first)
    expected = torch.cat([first, initial[3:]])
    torch.testing.assert_close(queue.keys, expected)
    assert int(queue.ptr) == 3
    queue.enqueue(second)
    # rows 3, 4 get 4, 5; the write wraps and row 0 gets 6 (the oldest key, 1, is dropped)
    expected = torch.tensor([[6.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0]])
    torch.testing.assert_close(queue.keys, expected)
    assert int(queue.ptr) == 1


def test_full_size_batch_replaces_everything():
    queue = NegativeQueue(size=4, dim=3)
    queue.enqueue(torch.ones(2, 3))
    keys = torch.arange(12.0).view(4, 3)
    queue.enqueue(keys)
    torch.testing.assert_close(queue.keys, torch.cat([keys[2:], keys[:2]]))
    assert int(queue.ptr) == 2


def test_state_dict_round_trip():
    queue = NegativeQueue(size=6, dim=3)
    queue.enqueue(torch.randn(4, 3))
    restored = NegativeQueue(size=6, dim=3)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.keys, queue.keys)
    assert int(restored.ptr) == 4
    assert set(queue.state_dict()) == {"keys", "ptr"}


def test_enqueue_does_not_track_gradients():
    queue = NegativeQueue(size=4, dim=2)
    keys = torch.randn(2, 2, requires_grad=True)
    queue.enqueue(keys * 2)
    assert not queue.keys.requires_grad


def test_rejects_bad_inputs():
    queue = NegativeQueue(size=4, dim=2)
    with pytest.raises(ValueError, match="shape"):
        queue.enqueue(torch.randn(2, 3))
    with pytest.raises(ValueError, match="size"):
        queue.enqueue(torch.randn(5, 2))
    with pytest.raises(ValueError):
        NegativeQueue(size=0, dim=2)
