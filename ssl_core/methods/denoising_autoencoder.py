"""Denoising autoencoder (Vincent et al. 2008): reconstruct the clean image from a corrupted one.

Corruption (``corruption``), applied to the normalised view ``x``:

- ``masking`` (the paper's masking noise): each pixel (all its channels) is set to 0, the mean of the normalised
  image, with probability ``drop_prob``;
- ``gaussian``: ``x + noise_std * N(0, 1)`` per value.

The encoder encodes the corrupted image, a ``ConvDecoder`` reconstructs the whole image from the pooled feature,
and the loss is the mean squared error to the clean view over every pixel (``RegionReconstructionLoss`` with an
all-ones mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_core.heads import ConvDecoder
from ssl_core.hparams import bounded
from ssl_core.losses import RegionReconstructionLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.views import ViewGenerator, crop_flip_view


def corrupt(images: Tensor, corruption: str, drop_prob: float, noise_std: float) -> Tensor:
    """``masking``: zero each pixel with probability ``drop_prob``; ``gaussian``: add ``noise_std`` white noise.
    Shape: (B, C, H, W) -> (B, C, H, W)."""
    if corruption == "masking":
        keep = torch.rand(images.shape[0], 1, *images.shape[2:], device=images.device) >= drop_prob
        return images * keep.to(images.dtype)
    if corruption == "gaussian":
        return images + noise_std * torch.randn_like(images)
    raise ValueError(f"unknown corruption {corruption!r}; known: masking, gaussian")


@dataclass(frozen=True)
class DenoisingAutoencoderConfig(MethodConfig):
    corruption: str = bounded("masking", choices=("masking", "gaussian"))
    drop_prob: float = bounded(0.25, 0.0, 0.95)
    noise_std: float = bounded(0.5, 0.0, 10.0)
    decoder_channels: int = bounded(128, 16, 1024)


@register_method("denoising_autoencoder")
class DenoisingAutoencoder(SSLMethod):
    Config = DenoisingAutoencoderConfig

    def __init__(self, config: DenoisingAutoencoderConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder()
        self.decoder = ConvDecoder(self.encoder.feature_dim, 3, config.image_size, config.decoder_channels)
        self.criterion = RegionReconstructionLoss()

    def view_generator(self) -> ViewGenerator:
        """A crop of 60-100% of the image and a flip."""
        return ViewGenerator.single_view(crop_flip_view(self.config.image_size, (0.6, 1.0)))

    def reconstruction_loss(self, clean: Tensor, corrupted: Tensor) -> Tensor:
        reconstruction = self.decoder(self.encoder(corrupted))
        everywhere = torch.ones(1, 1, *clean.shape[2:], device=clean.device)
        return self.criterion(reconstruction, clean, everywhere)

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        images = views["view1"]
        c = self.config
        return StepOutput(self.reconstruction_loss(images, corrupt(images, c.corruption, c.drop_prob, c.noise_std)))
