"""Exemplar (Dosovitskiy et al. 2014, "Discriminative Unsupervised Feature Learning with Exemplar CNNs"), in the
non-parametric form of Wu et al. (2018, eq. 2): every training image with its augmentations is one surrogate class.

Dosovitskiy et al. train a parametric softmax over a few thousand sampled images (one weight vector per class);
Wu et al. replace the weights by a memory bank of each image's own L2-normalised feature, which scales to every
image of the dataset. Implemented here is that non-parametric form with the EXACT softmax over all ``N`` images
(NPID, ``npid``, approximates the same softmax with NCE over ``K`` sampled negatives)::

    v = normalize(W f(x)),   loss = mean_b -log( exp(v_b . m_{i_b} / T) / sum_{j=1..N} exp(v_b . m_j / T) )
    m_{i_b} <- normalize(bank_momentum * m_{i_b} + (1 - bank_momentum) * v_b)     (after the loss)

with ``i_b`` the training row of image ``b`` (``views["row_index"]``). Per step: a ``(batch x N)`` logit matrix.
Memory: the bank, ``N x embedding_dim`` float32 on every rank (``ssl_core.memory_bank``), plus one copy of it
while the step's graph holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ssl_core.hparams import bounded
from ssl_core.memory_bank import MemoryBank, check_bank_size, sized_bank_config
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method, row_index
from ssl_core.views import ViewGenerator, moco_views


def instance_view(image_size: int) -> ViewGenerator:
    """One augmented view per image (Wu et al. 2018: random resized crop, colour jitter, grayscale, flip; the
    recipe MoCo v2 kept), under ``"view1"``."""
    return ViewGenerator.single_view(moco_views(image_size).view_configs["view1"])


@dataclass(frozen=True)
class ExemplarConfig(MethodConfig):
    temperature: float = bounded(0.07, 0.01, 10.0)
    embedding_dim: int = bounded(128, 8, 8192)
    bank_momentum: float = bounded(0.5, 0.0, 0.999)
    bank_size: int = bounded(0, 0, 1 << 31)
    """Rows of the memory bank = training images; 0: set by the pipeline from the train split."""
    gather_distributed: bool = True

    def for_train_rows(self, train_rows: int) -> ExemplarConfig:
        return sized_bank_config(self, train_rows)


@register_method("exemplar")
class Exemplar(SSLMethod):
    Config = ExemplarConfig

    def __init__(self, config: ExemplarConfig) -> None:
        super().__init__(config)
        check_bank_size(self.name, config.bank_size)
        self.encoder = self.build_encoder()
        self.embedding = nn.Linear(self.encoder.feature_dim, config.embedding_dim)
        self.bank = MemoryBank(config.bank_size, config.embedding_dim, config.gather_distributed)

    def view_generator(self) -> ViewGenerator:
        return instance_view(self.config.image_size)

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        rows = row_index(views, self.name)
        features = F.normalize(self.embedding(self.encoder(views["view1"])).float(), dim=1)
        # A copy: the bank is written below, and the logits' backward needs the rows they were computed from.
        logits = features @ self.bank.features.clone().T / self.config.temperature
        loss = F.cross_entropy(logits, rows.to(logits.device))
        accuracy = (logits.argmax(dim=1) == rows.to(logits.device)).float().mean().detach()
        self.bank.update(rows, features, self.config.bank_momentum)
        return StepOutput(loss, {"instance_accuracy": accuracy})
