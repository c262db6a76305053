"""A memory bank: one L2-normalised feature per training image (Wu et al. 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", Sec. 3.2), indexed by the image's training row.

NPID, Exemplar and PIRL draw their positives and negatives from it; PCL clusters it into prototypes. Row ``i``
holds the (momentum-averaged) feature of training image ``i``::

    bank[i] <- normalize(momentum * bank[i] + (1 - momentum) * feature_i)      (momentum 0: overwrite)

Memory: ``size x dim`` float32, i.e. ``4 * size * dim`` bytes on every rank (60,000 x 128: 31 MB; ImageNet's
1,281,167 x 128: 656 MB).

Distributed (``gather_distributed=True`` and a process group): ``update`` all-gathers the rows and features of
every rank first, so each rank writes the rows of every image seen in the global batch and all ranks hold the
same bank. A global batch must not name one row twice (the pipeline's shards are disjoint); if it does, one of the
writes wins.

The bank is a buffer, so ``state_dict()`` (the checkpoint) carries it and a resumed run restores it.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_core.distributed import concat_all_gather, is_distributed
from ssl_core.hparams import FieldValueError


def bank_megabytes(size: int, dim: int) -> float:
    """Memory of a float32 bank of ``size x dim``, in MB (1e6 bytes)."""
    return 4 * size * dim / 1e6


def check_bank_size(method_name: str, bank_size: int) -> None:
    """A memory-bank method cannot be built before it knows the training set size: raise naming ``bank_size``."""
    if bank_size <= 0:
        raise FieldValueError(
            "bank_size", bank_size,
            f"must be the number of training images: method {method_name!r} keeps one feature per image "
            "(the pipeline sets it from the train split; set it yourself outside the pipeline)",
        )


C = TypeVar("C")


def sized_bank_config(config: C, train_rows: int) -> C:
    """``config`` with ``bank_size = train_rows``; a ``bank_size`` already set to another value raises (the bank
    would not hold one row per training image)."""
    if train_rows <= 0:
        raise ValueError(f"train_rows={train_rows} must be positive")
    if config.bank_size not in (0, train_rows):
        raise FieldValueError(
            "bank_size", config.bank_size,
            f"does not match the {train_rows} training rows: leave it at 0 and the pipeline sets it",
        )
    return dataclasses.replace(config, bank_size=train_rows)


class MemoryBank(nn.Module):
    """``size`` L2-normalised features of dimension ``dim`` (buffer ``features``), random unit vectors at first.

    Shape: ``features`` (size, dim).
    """

    features: Tensor

    def __init__(self, size: int, dim: int, gather_distributed: bool = True) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"size={size} must be positive")
        if dim <= 0:
            raise ValueError(f"dim={dim} must be positive")
        self.size, self.dim, self.gather_distributed = size, dim, gather_distributed
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))

    def _check_rows(self, rows: Tensor) -> None:
        if rows.ndim != 1 or rows.dtype != torch.long:
            raise ValueError(f"rows must be a 1-D int64 tensor, got {tuple(rows.shape)} {rows.dtype}")
        # On CUDA an out-of-range index is a device-side assert; checking it would sync the host every step.
        if rows.device.type == "cpu" and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.size):
            raise IndexError(f"row indices must be in [0, {self.size}), got [{int(rows.min())}, {int(rows.max())}]: "
                             "is bank_size the number of training images?")

    def rows(self, rows: Tensor) -> Tensor:
        """A copy of the features of ``rows``. Shape: (batch,) -> (batch, dim)."""
        self._check_rows(rows)
        return self.features.index_select(0, rows.to(self.features.device))

    def sample_rows(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """Uniformly drawn row indices (NPID's noise distribution ``P_n = 1/size``), on the bank's device."""
        device = generator.device if generator is not None else self.features.device
        return torch.randint(0, self.size, shape, generator=generator, device=device).to(self.features.device)

    @torch.no_grad()
    def update(self, rows: Tensor, features: Tensor, momentum: float) -> None:
        """``bank[r] = normalize(momentum * bank[r] + (1 - momentum) * normalize(f))`` for every (r, f) of the
        global batch (all-gathered when distributed). Shape: rows (batch,), features (batch, dim)."""
        if features.ndim != 2 or features.shape[1] != self.dim or features.shape[0] != rows.shape[0]:
            raise ValueError(f"features must have shape ({rows.shape[0]}, {self.dim}), got {tuple(features.shape)}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} must be in [0, 1)")
        features = F.normalize(features.detach().float(), dim=1)
        rows = rows.to(features.device)
        if self.gather_distributed and is_distributed():
            rows, features = concat_all_gather(rows), concat_all_gather(features)
        self._check_rows(rows)
        rows = rows.to(self.features.device)
        features = features.to(self.features.device, self.features.dtype)
        if momentum > 0:
            features = F.normalize(momentum * self.features.index_select(0, rows) + (1 - momentum) * features, dim=1)
        self.features.index_copy_(0, rows, features)

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, {bank_megabytes(self.size, self.dim):.1f} MB, "
                f"gather_distributed={self.gather_distributed}")
