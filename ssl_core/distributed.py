"""Process-group helpers that degrade to single-process identities.

Distributed is a flag, never an assumption: every function here works in one CPU process without a process
group (``world_size() == 1``, ``rank() == 0``, gathers return their input), and uses ``torch.distributed``
only when it is available and initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather ``tensor`` from every rank and concatenate along dim 0, keeping gradients.

    Gradients flow back to every rank's local slice (``torch.distributed.nn.functional.all_gather`` sums
    the incoming gradients across ranks in its backward), as needed for contrastive losses whose negatives
    come from the global batch. Every rank must pass the same shape.

    Shape: (batch, *) -> (world_size * batch, *), rank order. Identity without a process group.
    """
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather ``tensor`` from every rank and concatenate along dim 0, without gradients.

    Used for MoCo's key queue and DINO's center, which must not back-propagate. Every rank must pass the
    same shape.

    Shape: (batch, *) -> (world_size * batch, *), rank order. Identity (detached) without a process group.
    """
    if world_size() == 1:
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)
