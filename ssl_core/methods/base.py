"""The SSL method interface, its registry and the shared backbone fields of every method's Config.

A method is an ``nn.Module`` that owns its backbone, heads and loss. The training loop calls, per step::

    out = method.training_step(views)          # views: dict of augmented batches, see ``view_generator()``
    out.loss.backward(); optimizer.step()
    method.on_after_optimizer_step(step, total_steps)   # EMA teachers, schedules

Everything a method must carry across a checkpoint (EMA teacher, MoCo queue, DINO center) is a parameter or a
buffer, so ``state_dict()`` is the whole method state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssl_core import augment, optim
from ssl_core.backbones import BACKBONES, build_backbone
from ssl_core.ema import cosine_momentum, ema_update
from ssl_core.hparams import bounded, config_from_dict, validate_config
from ssl_core.registry import Registry


@dataclass
class MethodConfig:
    """Fields every method shares: which backbone, and the image size it is built and augmented for."""

    backbone: str = "resnet18"
    small_images: bool = True
    image_size: int = bounded(32, 8, 1024)


@dataclass
class StepOutput:
    """``loss``: the scalar to back-propagate; ``logs``: detached scalars to report (no host sync here)."""

    loss: Tensor
    logs: dict[str, Tensor] = dataclasses.field(default_factory=dict)


class SSLMethod(nn.Module):
    """Base class of every registered method (see module docstring for the contract)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    encoder: nn.Module

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        if config.backbone not in BACKBONES:
            raise ValueError(
                f"{type(config).__name__}.backbone={config.backbone!r} is unknown; known: {', '.join(BACKBONES.names())}"
            )
        validate_config(config)
        self.config = config

    def build_encoder(self, **kwargs: Any) -> nn.Module:
        c = self.config
        return build_backbone(c.backbone, small_images=c.small_images, image_size=c.image_size, **kwargs)

    @property
    def feature_dim(self) -> int:
        return int(self.encoder.feature_dim)

    def view_generator(self) -> augment.ViewGenerator:
        """The paper's augmentation preset for this method, scaled to ``config.image_size``."""
        return augment.preset(self.name, self.config.image_size)

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        raise NotImplementedError

    def forward(self, views: dict[str, Tensor]) -> StepOutput:
        """``training_step``, so that a DistributedDataParallel wrapper synchronises its gradients."""
        return self.training_step(views)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum teacher) module pairs updated after each optimizer step."""
        return []

    def momentum_at(self, step: int, total_steps: int) -> float:
        """Teacher EMA momentum at ``step``: cosine from ``config.momentum`` to 1.0 (BYOL)."""
        return cosine_momentum(step, total_steps, getattr(self.config, "momentum"))

    @torch.no_grad()
    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        pairs = self.ema_pairs()
        if pairs:
            momentum = self.momentum_at(step, total_steps)
            for online, teacher in pairs:
                ema_update(online, teacher, momentum)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: weights decayed; biases and norm parameters neither decayed nor LARS-adapted."""
        return optim.param_groups(self, weight_decay)


METHODS: Registry[type[SSLMethod]] = Registry("method")


def register_method(name: str):
    """Class decorator: register an ``SSLMethod`` subclass under ``name``."""

    def decorator(cls: type[SSLMethod]) -> type[SSLMethod]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def build_method(name: str, config: MethodConfig | Mapping[str, Any] | None = None) -> SSLMethod:
    """Build the method registered as ``name`` from its Config or a mapping of its fields (validated)."""
    cls = METHODS.get(name)
    if config is None or isinstance(config, Mapping):
        config = config_from_dict(cls.Config, config, path=f"method.{name}")
    elif not isinstance(config, cls.Config):
        raise TypeError(f"method {name!r} takes a {cls.Config.__name__}, got {type(config).__name__}")
    return cls(config)


def method_config(name: str, values: Mapping[str, Any] | None = None, path: str | None = None) -> MethodConfig:
    """Validate ``values`` against the Config of method ``name`` without building the model."""
    return config_from_dict(METHODS.get(name).Config, values, path=path or f"method.{name}")


def available_methods() -> list[str]:
    return METHODS.names()
