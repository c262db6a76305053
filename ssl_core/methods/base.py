"""The SSL method interface, its registry and the shared backbone fields of every method's Config.

A method is an ``nn.Module`` that owns its backbone, heads and loss, and declares everything a training loop,
an evaluation or SimCLRv2-style fine-tuning needs from it; callers ask, they never read its attributes by name:

- ``view_generator()``: its augmentation views; ``normalization()``: the mean/std evaluation must apply;
- ``encoder`` (the backbone to keep) and ``feature_dim``;
- ``training_step(views) -> StepOutput(loss, logs)`` and ``on_after_optimizer_step(step, total_steps)``;
- ``param_groups(weight_decay)``, ``ema_pairs()``;
- ``finetune_head(layers)``: the first ``layers`` blocks of its projection head, the trunk fine-tuning keeps.

A training loop calls, per step::

    out = method.training_step(views)          # views: dict of augmented batches, see ``view_generator()``
    out.loss.backward(); optimizer.step()
    method.on_after_optimizer_step(step, total_steps)   # EMA teachers, schedules

Everything a method must carry across a checkpoint (EMA teacher, MoCo queue, DINO center, a memory bank) is a
parameter or a buffer, so ``state_dict()`` is the whole method state.

Methods with one memory row per training image (NPID, Exemplar, PIRL, PCL) also need, per step, each image's
training row: ``views[ROW_INDEX]``, int64 (B,), which ``ssl_core.training.ssl_objective`` copies from the batch
(the pipeline's Parquet reader numbers the rows), and the training set size, which their Config takes as
``bank_size`` through ``MethodConfig.for_train_rows`` (``build_method(..., train_rows=N)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssl_core import optim
from ssl_core.augment import Normalization
from ssl_core.backbones import BACKBONES, build_backbone
from ssl_core.ema import cosine_momentum, ema_update
from ssl_core.hparams import FieldValueError, Validated, bounded, config_from_dict
from ssl_core.registry import Registry
from ssl_core.views import ViewGenerator

ROW_INDEX = "row_index"
"""Key of the training-row index of each image in a step's ``views`` (int64 (B,)), for methods that use it."""


def row_index(views: Mapping[str, Tensor], method_name: str) -> Tensor:
    """``views[ROW_INDEX]``, or a ``KeyError`` that says where it comes from."""
    if ROW_INDEX not in views:
        raise KeyError(f"method {method_name!r} needs views[{ROW_INDEX!r}], each image's training row (int64 (B,)): "
                       "the pipeline's Parquet reader supplies it; outside the pipeline add it to the views")
    return views[ROW_INDEX]


@dataclass(frozen=True)
class MethodConfig(Validated):
    """Fields every method shares: which backbone, and the image size it is built and augmented for.

    A subclass adds its hyperparameters (``bounded`` ranges), its cross-field rules (``check``) and, if it has a
    projection head, how many of its blocks fine-tuning can keep (``max_finetune_head_layers``).
    """

    backbone: str = "resnet18"
    small_images: bool = True
    image_size: int = bounded(32, 8, 1024)

    def check(self) -> None:
        if self.backbone not in BACKBONES:
            raise FieldValueError("backbone", self.backbone, f"is unknown; known: {', '.join(BACKBONES.names())}",
                                  f"{type(self).__name__}.backbone")

    def max_finetune_head_layers(self) -> int:
        """Blocks of the projection head that SimCLRv2-style fine-tuning can keep (0: the method has none)."""
        return 0

    def for_train_rows(self, train_rows: int) -> MethodConfig:
        """This config for a training set of ``train_rows`` images: a method that keeps one row per image (a
        memory bank) returns a copy sized for it; the others need nothing and return ``self``."""
        return self


@dataclass
class StepOutput:
    """``loss``: the scalar to back-propagate; ``logs``: detached scalars to report (no host sync here)."""

    loss: Tensor
    logs: dict[str, Tensor] = dataclasses.field(default_factory=dict)


def check_finetune_head_layers(method_name: str, config: MethodConfig, layers: int) -> None:
    """Raise ``FieldValueError`` (field ``head_layers``) unless ``0 <= layers <= config.max_finetune_head_layers()``."""
    available = config.max_finetune_head_layers()
    if layers < 0 or layers > available:
        has = f"has {available} projection-head blocks" if available else "has no projection head; use 0"
        raise FieldValueError("head_layers", layers, f"is out of range: method {method_name!r} {has}")


class SSLMethod(nn.Module):
    """Base class of every registered method (see module docstring for the contract)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    encoder: nn.Module

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        if not isinstance(config, self.Config):
            raise TypeError(f"method {self.name!r} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def build_encoder(self, **kwargs: Any) -> nn.Module:
        c = self.config
        return build_backbone(c.backbone, small_images=c.small_images, image_size=c.image_size, **kwargs)

    @property
    def feature_dim(self) -> int:
        return int(self.encoder.feature_dim)

    def view_generator(self) -> ViewGenerator:
        """The method's augmentation views of a uint8 batch, scaled to ``config.image_size``."""
        raise NotImplementedError

    def normalization(self) -> Normalization:
        """The mean/std the views end with: evaluation and fine-tuning normalise images in [0, 1] with it."""
        return self.view_generator().normalization

    def projection_blocks(self) -> nn.Sequential:
        """The blocks of the projection head fine-tuning may keep (``len == config.max_finetune_head_layers()``)."""
        return nn.Sequential()

    def finetune_head(self, layers: int) -> nn.Sequential:
        """The first ``layers`` projection-head blocks (shared with this method, not copied); empty for 0.

        SimCLRv2 (Chen et al. 2020b, Sec. 2) fine-tunes "from the middle layer of the projection head": the
        encoder plus ``layers`` blocks ``Linear -> BN -> ReLU`` under a new linear classifier.
        """
        check_finetune_head_layers(self.name, self.config, layers)
        return self.projection_blocks()[:layers]

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


def build_method(name: str, config: MethodConfig | Mapping[str, Any] | None = None, *,
                 train_rows: int | None = None) -> SSLMethod:
    """Build the method registered as ``name`` from its Config or a mapping of its fields (validated);
    ``train_rows`` (the training set size) sizes a memory bank (``MethodConfig.for_train_rows``)."""
    cls = METHODS.get(name)
    if config is None or isinstance(config, Mapping):
        config = method_config(name, config)
    if train_rows is not None:
        config = config.for_train_rows(train_rows)
    return cls(config)


def method_config(name: str, values: Mapping[str, Any] | None = None, path: str | None = None) -> MethodConfig:
    """The Config of method ``name`` from a mapping of its fields, validated, without building the model."""
    return config_from_dict(METHODS.get(name).Config, values, path=path or f"method.{name}")


def available_methods() -> list[str]:
    return METHODS.names()
