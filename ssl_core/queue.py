"""MoCo's queue of negative keys (He et al. 2020, "Momentum Contrast", Alg. 1).

A FIFO of the most recent ``size`` key embeddings from the momentum encoder; the newest batch replaces the
oldest rows. With a process group initialised and ``gather_distributed=True`` each rank enqueues the keys of
the global batch, so every rank holds the same queue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_core.distributed import concat_all_gather, is_distributed


class NegativeQueue(nn.Module):
    """FIFO of ``size`` negative keys of dimension ``dim``, stored as buffers (saved in ``state_dict``).

    Buffers: ``keys`` (size, dim), initialised to random unit vectors; ``ptr`` long scalar, the row the
    next key is written to.
    """

    keys: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, gather_distributed: bool = True) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"size={size} must be positive")
        if dim <= 0:
            raise ValueError(f"dim={dim} must be positive")
        self.size = size
        self.dim = dim
        self.gather_distributed = gather_distributed
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (gathered over ranks first when distributed) at ``ptr``, wrapping around the end.

        Keys are stored as given (normalise them before enqueueing). The gathered batch must not exceed
        ``size``. Shape: (batch, dim).
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (batch, {self.dim}), got {tuple(keys.shape)}")
        if self.gather_distributed and is_distributed():
            keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        if batch_size > self.size:
            raise ValueError(f"cannot enqueue {batch_size} keys into a queue of size {self.size}")
        # The pointer stays on the device: reading it on the host (int(self.ptr)) would synchronise every step.
        positions = (torch.arange(batch_size, device=self.keys.device) + self.ptr) % self.size
        self.keys.index_copy_(0, positions, keys.detach().to(device=self.keys.device, dtype=self.keys.dtype))
        self.ptr.copy_((self.ptr + batch_size) % self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, gather_distributed={self.gather_distributed}"
