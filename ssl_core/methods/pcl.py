"""PCL (Li et al. 2021, "Prototypical Contrastive Learning of Unsupervised Representations"): MoCo v2 plus
ProtoNCE, a term that pulls each image's feature towards the prototypes (k-means centroids) of its cluster at
several granularities, each prototype with its own concentration (temperature).

- Memory: a bank of every training image's momentum-encoder feature (``ssl_core.memory_bank``, overwritten each
  time the image is seen: ``bank_momentum = 0``), ``N x projection_dim`` float32 on every rank; prototypes
  ``sum_m K_m x projection_dim``, concentrations ``sum_m K_m`` and assignments ``M x N`` int64 (buffers).
- E-step (``on_after_optimizer_step``): once an epoch's worth of images (``bank_size``) has been seen since the last
  clustering, and from ``prototype_warmup_epochs`` epochs on, the bank is k-means clustered
  (``ssl_core.kmeans``) into ``num_clusters[m]`` prototypes for every ``m``, with the concentration
  ``phi`` of each (``ssl_core.kmeans.concentration``). Seeded by the clustering's number: every rank computes the
  same prototypes from the same bank (and rank 0's are broadcast when distributed). The paper clusters at the start
  of every epoch, after 20 warm-up epochs of plain InfoNCE.
- M-step (``training_step``), symmetrised over the two views as ``moco``::

    loss = 1/2 sum_views [ InfoNCE(q, k', queue) + ProtoNCE(q; prototypes of the image's row) ]

  ProtoNCE counts only once the first clustering exists (``prototypes_ready``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssl_core.distributed import is_distributed
from ssl_core.ema import frozen_copy
from ssl_core.heads import ProjectionHead
from ssl_core.hparams import FieldValueError, bounded
from ssl_core.kmeans import concentration, kmeans
from ssl_core.losses import InfoNCEQueueLoss, ProtoNCELoss
from ssl_core.memory_bank import MemoryBank, check_bank_size, sized_bank_config
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method, row_index
from ssl_core.queue import NegativeQueue
from ssl_core.views import ViewGenerator, moco_views

PROJECTION_LAYERS = 2


@dataclass(frozen=True)
class PCLConfig(MethodConfig):
    temperature: float = bounded(0.2, 0.01, 10.0)
    """InfoNCE temperature, and the mean of the prototype concentrations."""
    num_clusters: tuple[int, ...] = (100, 200, 400)
    """Prototypes per clustering, one clustering per entry (the paper: 25000, 50000, 100000 on ImageNet)."""
    kmeans_iterations: int = bounded(10, 1, 1000)
    prototype_warmup_epochs: float = bounded(1.0, 0.0, 10000.0)
    """Epochs of plain InfoNCE before the first clustering (the paper: 20 of 200)."""
    queue_size: int = bounded(16384, 16, 1 << 20)
    momentum: float = bounded(0.999, 0.0, 1.0)
    projection_hidden_dim: int = bounded(2048, 16, 16384)
    projection_dim: int = bounded(128, 8, 8192)
    bank_size: int = bounded(0, 0, 1 << 31)
    """Rows of the feature memory = training images; 0: set by the pipeline from the train split."""
    gather_distributed: bool = True

    def check(self) -> None:
        super().check()
        if not self.num_clusters or any(k < 2 for k in self.num_clusters):
            raise FieldValueError("num_clusters", self.num_clusters, "must be a non-empty list of counts >= 2")
        if self.bank_size and max(self.num_clusters) > self.bank_size:
            raise FieldValueError("num_clusters", self.num_clusters,
                                  f"asks for more prototypes than the {self.bank_size} training images (bank_size)")

    def max_finetune_head_layers(self) -> int:
        return PROJECTION_LAYERS

    def for_train_rows(self, train_rows: int) -> PCLConfig:
        return sized_bank_config(self, train_rows)


@register_method("pcl")
class PCL(SSLMethod):
    Config = PCLConfig

    prototypes_ready: Tensor
    clusterings_done: Tensor

    def __init__(self, config: PCLConfig) -> None:
        super().__init__(config)
        check_bank_size(self.name, config.bank_size)
        self.encoder = self.build_encoder()
        self.projection_head = ProjectionHead(
            self.encoder.feature_dim, config.projection_hidden_dim, config.projection_dim, num_layers=PROJECTION_LAYERS
        )
        self.key_encoder = frozen_copy(self.encoder)
        self.key_projection_head = frozen_copy(self.projection_head)
        self.queue = NegativeQueue(config.queue_size, config.projection_dim, config.gather_distributed)
        self.bank = MemoryBank(config.bank_size, config.projection_dim, config.gather_distributed)
        dim = config.projection_dim
        for m, k in enumerate(config.num_clusters):  # placeholders until the first clustering: finite, unused
            self.register_buffer(f"prototypes_{m}", nn.functional.normalize(torch.randn(k, dim), dim=1))
            self.register_buffer(f"concentration_{m}", torch.full((k,), config.temperature))
            self.register_buffer(f"assignments_{m}", torch.zeros(config.bank_size, dtype=torch.long))
        self.register_buffer("prototypes_ready", torch.zeros(()))
        self.register_buffer("clusterings_done", torch.zeros((), dtype=torch.long))
        self.info_nce = InfoNCEQueueLoss(config.temperature)
        self.proto_nce = ProtoNCELoss()
        self._global_batch = 0

    def view_generator(self) -> ViewGenerator:
        return moco_views(self.config.image_size)

    def projection_blocks(self) -> nn.Sequential:
        return self.projection_head.layers

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.key_encoder), (self.projection_head, self.key_projection_head)]

    def _clusterings(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [(getattr(self, f"prototypes_{m}"), getattr(self, f"concentration_{m}"),
                 getattr(self, f"assignments_{m}")) for m in range(len(self.config.num_clusters))]

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        rows = row_index(views, self.name)
        v1, v2 = views["view1"], views["view2"]
        q1, q2 = self.projection_head(self.encoder(torch.cat([v1, v2]))).float().chunk(2)
        with torch.no_grad():
            k1 = self.key_projection_head(self.key_encoder(v1)).float()
            k2 = self.key_projection_head(self.key_encoder(v2)).float()
        negatives = self.queue.keys.clone()
        info_nce = 0.5 * (self.info_nce(q1, k2, negatives) + self.info_nce(q2, k1, negatives))
        clusterings = self._clusterings()
        prototypes = [p.clone() for p, _, _ in clusterings]
        concentrations = [c.clone() for _, c, _ in clusterings]
        assigned = [a.index_select(0, rows.to(a.device)) for _, _, a in clusterings]
        proto_nce = 0.5 * (self.proto_nce(q1, prototypes, concentrations, assigned)
                           + self.proto_nce(q2, prototypes, concentrations, assigned))
        loss = info_nce + self.prototypes_ready * proto_nce
        self.queue.enqueue(nn.functional.normalize(torch.cat([k1, k2]), dim=1))
        self.bank.update(rows, k1, momentum=0.0)
        self._global_batch = rows.shape[0] * (dist.get_world_size() if is_distributed() else 1)
        return StepOutput(loss, {"info_nce_loss": info_nce.detach(), "proto_nce_loss": proto_nce.detach()})

    def clustering_due(self, step: int) -> bool:
        """After step ``step`` (0-based): an epoch boundary in images (``(step + 1) x global batch`` crossed a
        multiple of ``bank_size``) at or after ``prototype_warmup_epochs``. A pure function of the step."""
        c = self.config
        if self._global_batch == 0:
            return False
        before, after = step * self._global_batch / c.bank_size, (step + 1) * self._global_batch / c.bank_size
        return int(after) > int(before) and after >= c.prototype_warmup_epochs

    @torch.no_grad()
    def update_prototypes(self) -> None:
        """The E-step: k-means of the bank for every granularity, concentrations, assignments (see module doc)."""
        c = self.config
        features = self.bank.features
        generator = torch.Generator().manual_seed(int(self.clusterings_done))
        for prototypes, phi, assignments in self._clusterings():
            centroids, assigned = kmeans(features, prototypes.shape[0], c.kmeans_iterations, generator)
            phi.copy_(concentration(features, centroids, assigned, c.temperature))
            prototypes.copy_(nn.functional.normalize(centroids, dim=1))
            assignments.copy_(assigned)
            if is_distributed():
                for buffer in (prototypes, phi, assignments):
                    dist.broadcast(buffer, src=0)
        self.prototypes_ready.fill_(1.0)
        self.clusterings_done += 1

    @torch.no_grad()
    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        super().on_after_optimizer_step(step, total_steps)
        if self.clustering_due(step):
            self.update_prototypes()
