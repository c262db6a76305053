import warnings

import pytest
import torch
from torch import nn

from ssl_core.augment import host_to_device
from ssl_core.device import autocast, compile_or_eager, uses_channels_last, views_to_memory_format


def _broken_backend(graph_module, example_inputs):
    raise RuntimeError("no compiler on this machine")


def test_compile_failure_falls_back_to_eager_with_a_warning():
    module = nn.Linear(3, 2)
    wrapped = compile_or_eager(module, backend=_broken_backend)
    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="torch.compile failed, running Linear eagerly.*no compiler"):
        out = wrapped(x)
    torch.testing.assert_close(out, module(x))
    assert not wrapped.compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then eager without trying again
        torch.testing.assert_close(wrapped(x), module(x))
    assert list(wrapped.state_dict()) == ["module.weight", "module.bias"]


def test_compile_success_keeps_compiling_and_gradients_flow():
    module = nn.Linear(3, 2)
    wrapped = compile_or_eager(module, backend="eager")
    wrapped(torch.randn(4, 3)).sum().backward()
    assert wrapped.compiled
    assert module.weight.grad is not None


def test_cpu_policy_is_float32_channels_last():
    cpu = torch.device("cpu")
    assert uses_channels_last(cpu)
    views = views_to_memory_format({"view1": torch.randn(2, 3, 8, 8)}, cpu)
    assert views["view1"].is_contiguous(memory_format=torch.channels_last)
    with autocast(cpu):
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32


def test_host_to_device_on_same_device_is_identity():
    tensor = torch.arange(3)
    assert host_to_device(tensor, torch.device("cpu")) is tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_to_device_to_cuda_is_exact():
    tensor = torch.rand(5, 14)
    torch.testing.assert_close(host_to_device(tensor, torch.device("cuda")).cpu(), tensor)
