"""MAE (He et al. 2022): encode the visible patches of a ViT, reconstruct the masked ones with a light decoder.

Loss: per-patch MSE on masked patches only, against per-patch normalised pixels (``normalize_pixels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.augment import random_masking
from ssl_core.backbones import TransformerBlock, VisionTransformer, sincos_position_embedding_2d
from ssl_core.hparams import FieldValueError, bounded
from ssl_core.losses import MaskedReconstructionLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.views import ViewGenerator, crop_flip_view


@dataclass(frozen=True)
class MAEConfig(MethodConfig):
    backbone: str = "vit_tiny"
    small_images: bool = False
    mask_ratio: float = bounded(0.75, 0.05, 0.95)
    decoder_dim: int = bounded(192, 16, 2048)
    decoder_depth: int = bounded(4, 1, 24)
    decoder_heads: int = bounded(3, 1, 32)
    normalize_pixels: bool = True

    def check(self) -> None:
        super().check()
        if not self.backbone.startswith("vit_"):
            raise FieldValueError("backbone", self.backbone, "must be a ViT (vit_tiny, vit_small)", "MAEConfig.backbone")


class MAEDecoder(nn.Module):
    """Visible tokens + mask tokens, unshuffled, through transformer blocks to per-patch pixel predictions.

    Shape: tokens (B, 1 + n_keep, encoder_dim), ids_restore (B, N) -> (B, N, patch_size**2 * 3).
    """

    def __init__(self, encoder: VisionTransformer, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = torch.cat([torch.zeros(1, dim), sincos_position_embedding_2d(dim, encoder.grid_size)])
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.predict = nn.Linear(dim, encoder.patch_size**2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.embed(tokens)
        batch, num_patches = ids_restore.shape
        masks = self.mask_token.expand(batch, num_patches + 1 - x.shape[1], -1).to(x.dtype)
        patches = torch.cat([x[:, 1:], masks], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.predict(self.norm(x))[:, 1:]


@register_method("mae")
class MAE(SSLMethod):
    Config = MAEConfig

    def __init__(self, config: MAEConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder()
        self.decoder = MAEDecoder(self.encoder, config.decoder_dim, config.decoder_depth, config.decoder_heads)
        self.criterion = MaskedReconstructionLoss(normalize_pixels=config.normalize_pixels)

    def view_generator(self) -> ViewGenerator:
        """RandomResizedCrop(scale=(0.2, 1.0)) and a horizontal flip, nothing else (He et al. 2022)."""
        return ViewGenerator.single_view(crop_flip_view(self.config.image_size, (0.2, 1.0)))

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        images = views["view1"]
        ids_keep, mask, ids_restore = random_masking(
            images.shape[0], self.encoder.num_patches, self.config.mask_ratio, device=images.device
        )
        prediction = self.decoder(self.encoder.forward_visible(images, ids_keep), ids_restore).float()
        target = self.encoder.patchify(images.float())
        return StepOutput(self.criterion(prediction, target, mask))
