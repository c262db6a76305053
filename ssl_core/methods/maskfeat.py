"""MaskFeat (Wei et al. 2022): mask patches of a ViT's input and regress the HOG features of the masked patches.

A masked patch's token is replaced by a learned mask token (the position embedding is still added) and the ViT
encodes every token; a linear head maps each output patch token to the HOG of its patch (``ssl_core.hog``:
``hog_cells_per_patch**2`` cells, 3 colour channels, ``hog_bins`` orientations, each cell L2-normalised), computed
on the device from the view the encoder sees. Loss: mean squared error over the masked patches only
(``MaskedReconstructionLoss`` without per-patch normalisation). Masking is per-patch random at ``mask_ratio`` (the
paper masks blocks of patches, 40%). Views: crop and flip, as MAE's.

The encoder's feature (kNN, fine-tuning, distillation) is the mean of its patch tokens (``pool="mean"``): MaskFeat
never trains the CLS token directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.augment import random_masking
from ssl_core.backbones import default_vit_patch_size
from ssl_core.hog import patch_hog_targets
from ssl_core.hparams import FieldValueError, bounded
from ssl_core.losses import MaskedReconstructionLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.views import ViewGenerator, crop_flip_view


@dataclass(frozen=True)
class MaskFeatConfig(MethodConfig):
    backbone: str = "vit_tiny"
    small_images: bool = False
    encoder_depth: int = bounded(12, 1, 48)
    """Transformer blocks of the ViT encoder (12 in ViT-Tiny/Small; fewer for small CPU runs)."""
    mask_ratio: float = bounded(0.4, 0.05, 0.95)
    hog_bins: int = bounded(9, 2, 36)
    hog_cells_per_patch: int = bounded(2, 1, 8)
    """Cells per patch side: the HOG cell is ``patch_size / hog_cells_per_patch`` pixels (16 / 2 = 8 in the paper)."""

    def check(self) -> None:
        super().check()
        where = type(self).__name__
        if not self.backbone.startswith("vit_"):
            raise FieldValueError("backbone", self.backbone, "must be a ViT (vit_tiny, vit_small)", f"{where}.backbone")
        patch_size = default_vit_patch_size(self.image_size)
        if patch_size % self.hog_cells_per_patch:
            raise FieldValueError("hog_cells_per_patch", self.hog_cells_per_patch,
                                  f"must divide the ViT patch size {patch_size} (image_size={self.image_size})",
                                  f"{where}.hog_cells_per_patch")
        if round(((self.image_size // patch_size) ** 2) * (1 - self.mask_ratio)) < 1:
            raise FieldValueError("mask_ratio", self.mask_ratio, f"keeps no patch at image_size={self.image_size}",
                                  f"{where}.mask_ratio")


@register_method("maskfeat")
class MaskFeat(SSLMethod):
    Config = MaskFeatConfig

    def __init__(self, config: MaskFeatConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder(pool="mean", depth=config.encoder_depth)
        self.mask_token = nn.Parameter(torch.zeros(self.encoder.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.cell_size = self.encoder.patch_size // config.hog_cells_per_patch
        target_dim = config.hog_cells_per_patch**2 * 3 * config.hog_bins
        self.predictor = nn.Linear(self.encoder.embed_dim, target_dim)
        self.criterion = MaskedReconstructionLoss(normalize_pixels=False)

    def view_generator(self) -> ViewGenerator:
        """RandomResizedCrop(scale=(0.5, 1.0)) and a horizontal flip (MaskFeat's ImageNet recipe)."""
        return ViewGenerator.single_view(crop_flip_view(self.config.image_size, (0.5, 1.0)))

    def hog_targets(self, images: Tensor) -> Tensor:
        """HOG of every patch of ``images``. Shape: (B, 3, H, W) -> (B, num_patches, target_dim)."""
        return patch_hog_targets(images, self.encoder.patch_size, self.cell_size, self.config.hog_bins)

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        images = views["view1"]
        _, mask, _ = random_masking(images.shape[0], self.encoder.num_patches, self.config.mask_ratio,
                                    device=images.device)
        tokens = self.encoder.forward_tokens(images, mask.bool(), self.mask_token)
        prediction = self.predictor(tokens[:, 1:]).float()
        with torch.no_grad():
            target = self.hog_targets(images)
        return StepOutput(self.criterion(prediction, target, mask))
