"""Context encoder (Pathak et al. 2016, inpainting): reconstruct the masked centre of an image from its context.

The central square of side ``round(mask_fraction * image_size)`` (the paper: half the side, a quarter of the area)
is filled with 0, the mean of the normalised image, the encoder encodes what is left, and a ``ConvDecoder``
reconstructs the whole image from the pooled feature; the loss is the mean squared error over the masked region
only (``ssl_core.losses.RegionReconstructionLoss``), in the normalised pixel space of the view. The paper's
adversarial term and its extra weight on a band overlapping the context are left out (its "L2 only" ablation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_core.heads import ConvDecoder
from ssl_core.hparams import FieldValueError, bounded
from ssl_core.losses import RegionReconstructionLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.views import ViewGenerator, crop_flip_view


def centre_mask(image_size: int, mask_fraction: float, device: torch.device | str = "cpu") -> Tensor:
    """1 on the central square of side ``round(mask_fraction * image_size)``, else 0. Shape: (1, 1, S, S)."""
    side = round(mask_fraction * image_size)
    start = (image_size - side) // 2
    mask = torch.zeros(1, 1, image_size, image_size, device=device)
    mask[..., start : start + side, start : start + side] = 1.0
    return mask


@dataclass(frozen=True)
class ContextEncoderConfig(MethodConfig):
    mask_fraction: float = bounded(0.5, 0.1, 0.9)
    decoder_channels: int = bounded(128, 16, 1024)

    def check(self) -> None:
        super().check()
        if round(self.mask_fraction * self.image_size) < 1:
            raise FieldValueError("image_size/mask_fraction", (self.image_size, self.mask_fraction),
                                  "mask no pixel", "ContextEncoderConfig.image_size/mask_fraction")


@register_method("context_encoder")
class ContextEncoder(SSLMethod):
    Config = ContextEncoderConfig

    def __init__(self, config: ContextEncoderConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder()
        self.decoder = ConvDecoder(self.encoder.feature_dim, 3, config.image_size, config.decoder_channels)
        self.register_buffer("mask", centre_mask(config.image_size, config.mask_fraction), persistent=False)
        self.criterion = RegionReconstructionLoss()

    def view_generator(self) -> ViewGenerator:
        """A crop of 60-100% of the image and a flip."""
        return ViewGenerator.single_view(crop_flip_view(self.config.image_size, (0.6, 1.0)))

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        images = views["view1"]
        mask = self.mask.to(images.dtype)
        reconstruction = self.decoder(self.encoder(images * (1.0 - mask)))
        return StepOutput(self.criterion(reconstruction, images, self.mask))
