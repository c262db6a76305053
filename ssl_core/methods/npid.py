"""NPID (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination").

Each image is its own class; the class "weights" are a memory bank of every image's L2-normalised feature
(``ssl_core.memory_bank``), and the non-parametric softmax over all ``N`` images is approximated by NCE
(``ssl_core.losses.NCELoss``) with ``K`` negatives drawn uniformly from the bank, plus the proximal term (Sec. 3.4)
that keeps a feature close to its memory from the previous epoch::

    v_b = normalize(W f(x_b)),   s+_b = v_b . m_{i_b},   s-_bk = v_b . m_{j_k},  j_k ~ U{0..N-1}
    loss = NCE(s+, s-; Z, N) + proximal_weight * mean_b ||v_b - m_{i_b}||^2
    m_{i_b} <- normalize(bank_momentum * m_{i_b} + (1 - bank_momentum) * v_b)     (after the loss)

``i_b`` is the training row of image ``b`` (``views["row_index"]``). The ``K`` negatives are drawn once per step
and shared by the batch (one ``(K, dim)`` gather instead of ``(batch, K, dim)``). ``Z`` (buffer ``normalizer``)
is estimated on the first step, averaged over ranks, and then held fixed, as in the paper.

Memory: the bank, ``N x embedding_dim`` float32 on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_core.distributed import concat_all_gather
from ssl_core.hparams import bounded
from ssl_core.losses import NCELoss
from ssl_core.memory_bank import MemoryBank, check_bank_size, sized_bank_config
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method, row_index
from ssl_core.methods.exemplar import instance_view
from ssl_core.views import ViewGenerator


@dataclass(frozen=True)
class NPIDConfig(MethodConfig):
    temperature: float = bounded(0.07, 0.01, 10.0)
    num_negatives: int = bounded(4096, 1, 1 << 20)
    """K, noise samples per step (the paper: 4096)."""
    proximal_weight: float = bounded(30.0, 0.0, 1000.0)
    """lambda of the proximal term (the paper studies 0 to 50)."""
    embedding_dim: int = bounded(128, 8, 8192)
    bank_momentum: float = bounded(0.5, 0.0, 0.999)
    bank_size: int = bounded(0, 0, 1 << 31)
    """Rows of the memory bank = training images; 0: set by the pipeline from the train split."""
    gather_distributed: bool = True

    def for_train_rows(self, train_rows: int) -> NPIDConfig:
        return sized_bank_config(self, train_rows)


def fixed_normalizer(normalizer: Tensor, criterion: NCELoss, positive: Tensor, negatives: Tensor,
                     num_instances: int, gather_distributed: bool) -> Tensor:
    """NCE's ``Z``: ``normalizer`` once set (> 0); else this batch's estimate (mean over ranks when distributed),
    written into ``normalizer``. No host sync."""
    estimate = criterion.estimate_normalizer(positive, negatives, num_instances)
    if gather_distributed:
        estimate = concat_all_gather(estimate.reshape(1)).mean()
    value = torch.where(normalizer > 0, normalizer, estimate.to(normalizer.dtype))
    normalizer.copy_(value)
    return value


@register_method("npid")
class NPID(SSLMethod):
    Config = NPIDConfig

    normalizer: Tensor

    def __init__(self, config: NPIDConfig) -> None:
        super().__init__(config)
        check_bank_size(self.name, config.bank_size)
        self.encoder = self.build_encoder()
        self.embedding = nn.Linear(self.encoder.feature_dim, config.embedding_dim)
        self.bank = MemoryBank(config.bank_size, config.embedding_dim, config.gather_distributed)
        self.criterion = NCELoss(config.temperature)
        self.register_buffer("normalizer", torch.zeros(()))

    def view_generator(self) -> ViewGenerator:
        return instance_view(self.config.image_size)

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        c = self.config
        rows = row_index(views, self.name)
        features = F.normalize(self.embedding(self.encoder(views["view1"])).float(), dim=1)
        memory = self.bank.rows(rows)
        negatives = self.bank.rows(self.bank.sample_rows((c.num_negatives,)))
        positive_scores = (features * memory).sum(dim=1)
        negative_scores = features @ negatives.T
        z = fixed_normalizer(self.normalizer, self.criterion, positive_scores, negative_scores, c.bank_size,
                             c.gather_distributed)
        nce = self.criterion(positive_scores, negative_scores, z, c.bank_size)
        proximal = (features - memory).pow(2).sum(dim=1).mean()
        self.bank.update(rows, features, c.bank_momentum)
        return StepOutput(nce + c.proximal_weight * proximal, {"nce_loss": nce.detach(),
                                                               "proximal_loss": proximal.detach()})
