"""Named views of a batch (``ViewGenerator``) and the papers' recipes for them, scaled to the image size.

A method's ``view_generator()`` picks one of the recipes (or composes its own from ``ViewConfig``s). Below 64 px
Gaussian blur is off, as in the papers' CIFAR recipes. Two-view recipes give ``"view1"``/``"view2"``, single-view
ones ``"view1"``, DINO's multi-crop ``"global_0"``, ``"global_1"``, ``"local_*"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
from torch import Tensor

from ssl_core.augment import IMAGENET_MEAN, IMAGENET_STD, Normalization, ViewConfig, augment_float, to_float_image


class ViewGenerator:
    """Named views of a batch: ``generator_fn(images, generator) -> {name: (B, 3, size, size)}``.

    Views are drawn in the order of ``view_configs``, one after another from the same generator.
    """

    def __init__(self, view_configs: Mapping[str, ViewConfig]) -> None:
        if not view_configs:
            raise ValueError("ViewGenerator needs at least one view config")
        for name, cfg in view_configs.items():
            if not isinstance(cfg, ViewConfig):
                raise ValueError(f"view {name!r}: expected a ViewConfig, got {type(cfg).__name__}")
        normalizations = {(cfg.mean, cfg.std) for cfg in view_configs.values()}
        if len(normalizations) > 1:
            raise ValueError(f"the views of one generator must share one mean/std, got {sorted(normalizations)}")
        self.view_configs: Mapping[str, ViewConfig] = MappingProxyType(dict(view_configs))
        (mean, std), = normalizations
        self.normalization = Normalization(mean, std)
        """The normalisation every view ends with."""

    @classmethod
    def single_view(cls, cfg: ViewConfig) -> ViewGenerator:
        """One view under the key ``"view1"`` (MAE, rotation)."""
        return cls({"view1": cfg})

    @classmethod
    def two_view(cls, cfg1: ViewConfig, cfg2: ViewConfig | None = None) -> ViewGenerator:
        """Keys ``"view1"``, ``"view2"``; ``cfg2=None`` makes the two views symmetric (``cfg1`` twice)."""
        return cls({"view1": cfg1, "view2": cfg2 if cfg2 is not None else cfg1})

    @classmethod
    def multi_crop(
        cls,
        global_cfg: ViewConfig | Sequence[ViewConfig],
        local_cfg: ViewConfig,
        num_local: int,
    ) -> ViewGenerator:
        """Keys ``"global_0"``, ``"global_1"``, ..., ``"local_0"``, ..., ``"local_{num_local - 1}"``.

        ``global_cfg`` is one config for two identical-recipe global crops, or a sequence with one config per
        global crop (DINO's asymmetric blur / solarisation).
        """
        global_cfgs = [global_cfg, global_cfg] if isinstance(global_cfg, ViewConfig) else list(global_cfg)
        if not global_cfgs:
            raise ValueError("multi_crop needs at least one global crop config")
        if num_local < 0:
            raise ValueError(f"num_local={num_local} must be >= 0")
        views = {f"global_{i}": cfg for i, cfg in enumerate(global_cfgs)}
        views.update({f"local_{i}": local_cfg for i in range(num_local)})
        return cls(views)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Shape: (B, 1 or 3, H, W) uint8 or float -> {name: (B, 3, size, size) float32}."""
        float_images = to_float_image(images)
        return {name: augment_float(float_images, cfg, generator) for name, cfg in self.view_configs.items()}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={cfg.output_size}" for name, cfg in self.view_configs.items())
        return f"{type(self).__name__}({sizes})"


def is_small_image(image_size: int) -> bool:
    """CIFAR-like resolutions, where the papers' CIFAR recipes drop Gaussian blur."""
    return image_size < 64


def local_crop_size(image_size: int) -> int:
    """DINO's local crop side, ``image_size * 96 / 224`` rounded to whole ViT patches (a multiple of 8 up to 64px,
    of 16 above, as the ViT patch size is 4 up to 64px and 16 above): 32 -> 16, 96 -> 48, 224 -> 96."""
    multiple = 8 if image_size <= 64 else 16
    return max(multiple, multiple * round(image_size * 96 / 224 / multiple))


def simclr_views(image_size: int) -> ViewGenerator:
    """SimCLR appendix A: jitter strength s = 1.0 on ImageNet with blur p=0.5; s = 0.5 and no blur on CIFAR."""
    small = is_small_image(image_size)
    strength = 0.5 if small else 1.0
    cfg = ViewConfig(
        image_size,
        crop_scale=(0.08, 1.0),
        jitter_prob=0.8,
        brightness=0.8 * strength,
        contrast=0.8 * strength,
        saturation=0.8 * strength,
        hue=0.2 * strength,
        grayscale_prob=0.2,
        blur_prob=0.0 if small else 0.5,
    )
    return ViewGenerator.two_view(cfg)


def moco_views(image_size: int) -> ViewGenerator:
    """MoCo v2: crop scale (0.2, 1), jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale 0.2, blur p=0.5 (dropped on CIFAR)."""
    cfg = ViewConfig(
        image_size,
        crop_scale=(0.2, 1.0),
        saturation=0.4,
        blur_prob=0.0 if is_small_image(image_size) else 0.5,
    )
    return ViewGenerator.two_view(cfg)


def byol_view_pair(image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0)) -> tuple[ViewConfig, ViewConfig]:
    """BYOL table 6: jitter 0.4/0.4/0.2/0.1 p=0.8, grayscale 0.2; blur p=1.0 / 0.1, solarize p=0.0 / 0.2."""
    small = is_small_image(image_size)
    first = ViewConfig(image_size, crop_scale=crop_scale, blur_prob=0.0 if small else 1.0, solarize_prob=0.0)
    second = dataclasses.replace(first, blur_prob=0.0 if small else 0.1, solarize_prob=0.2)
    return first, second


def byol_views(image_size: int) -> ViewGenerator:
    """BYOL's asymmetric pair (also Barlow Twins' recipe)."""
    return ViewGenerator.two_view(*byol_view_pair(image_size))


def dino_views(image_size: int, num_local_crops: int) -> ViewGenerator:
    """DINO: BYOL's asymmetric global crops at scale (0.4, 1); local crops at 96/224 of the size, scale
    (0.05, 0.4), blur p=0.5."""
    local_cfg = ViewConfig(
        local_crop_size(image_size),
        crop_scale=(0.05, 0.4),
        blur_prob=0.0 if is_small_image(image_size) else 0.5,
    )
    return ViewGenerator.multi_crop(byol_view_pair(image_size, crop_scale=(0.4, 1.0)), local_cfg, num_local_crops)


def crop_flip_view(
    image_size: int,
    crop_scale: tuple[float, float],
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> ViewConfig:
    """Random resized crop at ``crop_scale`` and a horizontal flip, no colour change: MAE (0.2, 1), RotNet (0.6, 1),
    SimCLRv2 fine-tuning and distillation (0.5, 1, with the encoder's normalisation)."""
    return ViewConfig(image_size, crop_scale=crop_scale, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
                      solarize_prob=0.0, mean=mean, std=std)
