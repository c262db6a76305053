"""I-JEPA (Assran et al. 2023): predict, in feature space, the target encoder's features of several image blocks
from one large context block.

Per image, ``num_targets`` target blocks (each ``target_scale`` of the patches, aspect ratio in
``target_aspect``) and one context block (``context_scale`` of the patches, square) are drawn on the patch grid;
the target patches are removed from the context. Block sizes are drawn once per batch (every image's blocks
have the same size, so the batch stacks), positions per image; every image keeps the same number of context
patches (the smallest count in the batch, a random subset of each image's context), as in the paper's collator.

- context encoder (the ViT kept as the encoder) sees only the context patches (``forward_visible``);
- a narrow ViT predictor takes the context tokens and, for each target block, mask tokens at the target positions
  (sin-cos position embeddings at its own width) and predicts the target encoder's features there;
- the target encoder is an EMA of the context encoder (cosine momentum schedule from ``momentum`` to 1) and sees
  the whole image; its outputs are layer-normalised (``FeaturePredictionLoss``) and regressed with an L2 loss.

No pixel reconstruction and no hand-made augmentations: the view is a random resized crop (scale 0.3-1), no flip,
no colour change. The encoder's feature (kNN, fine-tuning, distillation) is the mean of its patch tokens
(``pool="mean"``), as the paper evaluates I-JEPA: its CLS token is never a training target.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.augment import host_to_device
from ssl_core.backbones import TransformerBlock, VisionTransformer, sincos_position_embedding_2d
from ssl_core.ema import frozen_copy
from ssl_core.hparams import FieldValueError, bounded
from ssl_core.losses import FeaturePredictionLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.views import ViewGenerator, crop_flip_view

MAX_MASK_DRAWS = 20
"""Redraws allowed when the targets cover an image's whole context block."""


@dataclass(frozen=True)
class IJEPAConfig(MethodConfig):
    backbone: str = "vit_tiny"
    small_images: bool = False
    encoder_depth: int = bounded(12, 1, 48)
    """Transformer blocks of the ViT encoder (12 in ViT-Tiny/Small; fewer for small CPU runs)."""
    momentum: float = bounded(0.996, 0.0, 1.0)
    num_targets: int = bounded(4, 1, 8)
    target_scale_min: float = bounded(0.15, 0.01, 1.0)
    target_scale_max: float = bounded(0.2, 0.01, 1.0)
    target_aspect_min: float = bounded(0.75, 0.1, 10.0)
    target_aspect_max: float = bounded(1.5, 0.1, 10.0)
    context_scale_min: float = bounded(0.85, 0.05, 1.0)
    context_scale_max: float = bounded(1.0, 0.05, 1.0)
    predictor_dim: int = bounded(96, 8, 2048)
    predictor_depth: int = bounded(6, 1, 24)
    predictor_heads: int = bounded(3, 1, 32)

    def check(self) -> None:
        super().check()
        where = type(self).__name__
        if not self.backbone.startswith("vit_"):
            raise FieldValueError("backbone", self.backbone, "must be a ViT (vit_tiny, vit_small)", f"{where}.backbone")
        for low, high in (("target_scale_min", "target_scale_max"), ("target_aspect_min", "target_aspect_max"),
                          ("context_scale_min", "context_scale_max")):
            if getattr(self, low) > getattr(self, high):
                raise FieldValueError(low, getattr(self, low), f"must be <= {high}={getattr(self, high)}",
                                      f"{where}.{low}")
        if self.predictor_dim % self.predictor_heads or self.predictor_dim % 4:
            raise FieldValueError("predictor_dim", self.predictor_dim,
                                  f"must be divisible by 4 and by predictor_heads={self.predictor_heads}",
                                  f"{where}.predictor_dim")


def block_size(scale: float, aspect_ratio: float, grid_size: int) -> tuple[int, int]:
    """``(height, width)`` in patches of a block of ``scale * grid_size**2`` patches and ``height / width =
    aspect_ratio``: ``round(sqrt(area * ratio))`` by ``round(sqrt(area / ratio))``, each clamped to [1, grid_size]."""
    area = scale * grid_size**2
    height = min(grid_size, max(1, round(math.sqrt(area * aspect_ratio))))
    width = min(grid_size, max(1, round(math.sqrt(area / aspect_ratio))))
    return height, width


def _block_masks(batch: int, count: int, size: tuple[int, int], grid_size: int, generator: torch.Generator | None,
                 ) -> tuple[Tensor, Tensor]:
    """``count`` blocks of ``size`` per image at uniform positions: their patch ids (batch, count, h * w), row-major,
    and their union as a (batch, grid_size**2) bool mask."""
    height, width = size
    draws = torch.rand(batch, count, 2, generator=generator)
    top = (draws[..., 0] * (grid_size - height + 1)).long()
    left = (draws[..., 1] * (grid_size - width + 1)).long()
    rows = top.unsqueeze(-1) + torch.arange(height).repeat_interleave(width)
    cols = left.unsqueeze(-1) + torch.arange(width).repeat(height)
    ids = rows * grid_size + cols
    union = torch.zeros(batch, grid_size**2, dtype=torch.bool)
    union.scatter_(1, ids.reshape(batch, -1), True)
    return ids, union


def sample_blocks(config: IJEPAConfig, batch: int, grid_size: int, generator: torch.Generator | None = None,
                  ) -> tuple[Tensor, Tensor]:
    """I-JEPA's masks for a batch, drawn on the CPU: ``(context_ids (batch, n_context), target_ids (batch,
    num_targets, n_target))``, patch ids on the ``grid_size`` grid; context ids are sorted and never hit a target.

    Raises ``ValueError`` if after ``MAX_MASK_DRAWS`` draws some image keeps no context patch.
    """
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    num_patches = grid_size**2
    for _ in range(MAX_MASK_DRAWS):
        target_size = block_size(uniform(config.target_scale_min, config.target_scale_max),
                                 uniform(config.target_aspect_min, config.target_aspect_max), grid_size)
        context_size = block_size(uniform(config.context_scale_min, config.context_scale_max), 1.0, grid_size)
        target_ids, targets = _block_masks(batch, config.num_targets, target_size, grid_size, generator)
        _, context = _block_masks(batch, 1, context_size, grid_size, generator)
        context &= ~targets
        num_context = int(context.sum(dim=1).min())
        if num_context >= 1:
            # A random subset of num_context context patches per image: context first, in random order.
            order = torch.rand(batch, num_patches, generator=generator) + (~context).float() * 2
            context_ids = order.argsort(dim=1)[:, :num_context].sort(dim=1).values
            return context_ids, target_ids
    raise ValueError(
        f"the {config.num_targets} target blocks (target_scale_max={config.target_scale_max}) cover the whole "
        f"context block (context_scale_min={config.context_scale_min}) on a {grid_size}x{grid_size} patch grid"
    )


class IJEPAPredictor(nn.Module):
    """The narrow ViT predictor: context tokens plus, per target block, mask tokens at the target positions.

    Each target block is predicted in its own sequence (the context repeated ``num_targets`` times), as in the
    paper. Shape: context (B, n_context, encoder_dim), context_ids (B, n_context), target_ids (B, M, n_target)
    -> (B, M, n_target, encoder_dim).
    """

    def __init__(self, encoder: VisionTransformer, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_position_embedding_2d(dim, encoder.grid_size), persistent=False)
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.project = nn.Linear(dim, encoder.embed_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, context: Tensor, context_ids: Tensor, target_ids: Tensor) -> Tensor:
        batch, num_targets, num_target_patches = target_ids.shape
        x = self.embed(context) + self.pos_embed[context_ids]
        x = x.repeat_interleave(num_targets, dim=0)  # (B * M, n_context, dim), image-major
        queries = self.mask_token + self.pos_embed[target_ids.reshape(batch * num_targets, num_target_patches)]
        x = torch.cat([x, queries.to(x.dtype)], dim=1)
        for block in self.blocks:
            x = block(x)
        predicted = self.project(self.norm(x[:, -num_target_patches:]))
        return predicted.reshape(batch, num_targets, num_target_patches, -1)


@register_method("ijepa")
class IJEPA(SSLMethod):
    Config = IJEPAConfig

    def __init__(self, config: IJEPAConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder(pool="mean", depth=config.encoder_depth)
        self.predictor = IJEPAPredictor(self.encoder, config.predictor_dim, config.predictor_depth,
                                        config.predictor_heads)
        self.target_encoder = frozen_copy(self.encoder)
        self.criterion = FeaturePredictionLoss(normalize_target=True)

    def view_generator(self) -> ViewGenerator:
        """A random resized crop at scale (0.3, 1), nothing else (no flip, no colour: Assran et al. 2023)."""
        view = dataclasses.replace(crop_flip_view(self.config.image_size, (0.3, 1.0)), hflip_prob=0.0)
        return ViewGenerator.single_view(view)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder)]

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        images = views["view1"]
        context_ids, target_ids = sample_blocks(self.config, images.shape[0], self.encoder.grid_size)
        context_ids = host_to_device(context_ids, images.device)
        target_ids = host_to_device(target_ids, images.device)
        context = self.encoder.forward_visible(images, context_ids)[:, 1:]
        prediction = self.predictor(context, context_ids, target_ids).float()
        with torch.no_grad():
            features = self.target_encoder.forward_tokens(images)[:, 1:].float()  # (B, N, D)
            batch, num_targets, num_target_patches = target_ids.shape
            flat_ids = target_ids.reshape(batch, -1, 1).expand(-1, -1, features.shape[-1])
            target = torch.gather(features, 1, flat_ids).reshape(batch, num_targets, num_target_patches, -1)
        loss = self.criterion(prediction.flatten(1, 2), target.flatten(1, 2))
        logs = {"context_patches": torch.tensor(float(context_ids.shape[1])),
                "target_patches": torch.tensor(float(num_target_patches))}
        return StepOutput(loss, logs)
