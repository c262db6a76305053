"""Device policy of a training step, shared by the Ray Train loops and the benchmarks (plain PyTorch, no Ray).

- On CUDA: bf16 autocast; on CPU: float32. On both, the channels_last memory format for the model and the views:
  cuDNN's tensor-core kernels and oneDNN's CPU convolutions work in NHWC, and with NCHW tensors oneDNN reorders
  every convolution's input and gradient (ResNet-18 at 32 px, CPU: about 25% of the step's CPU time).
- ``compile_or_eager``: ``torch.compile`` of a module that falls back to eager execution, with a warning, when
  compilation fails on the first call (no C++ compiler, no Triton, an op the compiler rejects). The compile flag
  is a speed-up, never a reason for a run to die; the warning says it did not apply.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def uses_channels_last(device: torch.device) -> bool:
    """Whether models and images on ``device`` use the channels_last memory format (CUDA and CPU)."""
    return device.type in ("cuda", "cpu")


def model_to_memory_format(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` (moved in place) in channels_last where ``uses_channels_last``; unchanged elsewhere."""
    return model.to(memory_format=torch.channels_last) if uses_channels_last(device) else model


def images_to_memory_format(images: Tensor, device: torch.device) -> Tensor:
    """A (B, C, H, W) batch in channels_last where ``uses_channels_last``; unchanged elsewhere."""
    return images.contiguous(memory_format=torch.channels_last) if uses_channels_last(device) else images


def views_to_memory_format(views: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """``images_to_memory_format`` of every view."""
    return {name: images_to_memory_format(view, device) for name, view in views.items()}


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the compiler failed", not "the model is wrong" (names differ across torch versions)."""
    import torch._dynamo.exc as dynamo_exc

    errors: list[type[BaseException]] = [dynamo_exc.BackendCompilerFailed]
    for module_name, name in (("torch._dynamo.exc", "InternalTorchDynamoError"),
                              ("torch._dynamo.exc", "TritonUnavailableError"),
                              ("torch._inductor.exc", "InductorError")):
        try:
            module = __import__(module_name, fromlist=[name])
        except ImportError:
            continue
        error = getattr(module, name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


class CompileOrEager(nn.Module):
    """``torch.compile(module)`` that runs ``module`` eagerly from the first call whose compilation fails.

    The compiled wrapper is kept out of the module tree, so ``state_dict()`` keys are those of ``module``
    prefixed by ``module.``. ``compiled`` tells whether calls still go through ``torch.compile``.
    """

    def __init__(self, module: nn.Module, **compile_kwargs: Any) -> None:
        super().__init__()
        self.module = module
        self._compiled: list[Any] = [torch.compile(module, **compile_kwargs)]  # a list: not a registered submodule

    @property
    def compiled(self) -> bool:
        return bool(self._compiled)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled:
            try:
                return self._compiled[0](*args, **kwargs)
            except _compile_errors() as error:
                self._compiled.clear()
                reason = " ".join([line.strip() for line in str(error).splitlines() if line.strip()][:2])
                warnings.warn(f"torch.compile failed, running {type(self.module).__name__} eagerly: "
                              f"{reason or type(error).__name__}", RuntimeWarning, stacklevel=2)
        return self.module(*args, **kwargs)


def compile_or_eager(module: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """``module`` under ``torch.compile`` with an eager fallback (see ``CompileOrEager``)."""
    return CompileOrEager(module, **compile_kwargs)
