"""Worker-side pieces shared by the Ray Train loops (pretrain, finetune, distill): device setup, the optimizer
and its schedule, checkpoints through ``ray.train``, the non-finite loss guard, and per-epoch RNG seeding.

Ray calls are limited to ``ray.train.get_context``, ``get_checkpoint``, ``report`` and ``torch.prepare_model``.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray.train
import ray.train.torch
import torch
from torch import nn

from ssl_core.optim import LARS, warmup_cosine

CHECKPOINT_FILE = "checkpoint.pt"

Job = TypeVar("Job")


def job_from_dict(job_cls: type[Job], values: dict[str, Any]) -> Job:
    """Rebuild a frozen job dataclass from its ``dataclasses.asdict`` form (the dict that crosses the Ray
    boundary): fields typed as dataclasses (config sections) are rebuilt from their dicts."""
    hints = typing.get_type_hints(job_cls)
    return job_cls(**{
        name: hints[name](**value) if dataclasses.is_dataclass(hints[name]) else value for name, value in values.items()
    })


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world_size: int
    device: torch.device


def worker_info(cpus_per_worker: float) -> WorkerInfo:
    """Rank, world size and device of this Ray Train worker; CPU workers get ``ceil(cpus_per_worker)`` threads."""
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, math.ceil(cpus_per_worker)))
    return WorkerInfo(context.get_world_rank(), context.get_world_size(), device)


def seed_epoch(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seed torch's global RNG and return the augmentation generator for (seed, epoch, rank).

    RNG is a pure function of the epoch, so a run resumed from a checkpoint draws the same augmentations as
    an uninterrupted one, without saving generator state.
    """
    key = (seed * 1_000_003 + epoch) * 4099 + rank
    torch.manual_seed(key)
    return torch.Generator().manual_seed(key)


def build_optimizer(
    param_groups: list[dict[str, Any]], name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """LARS (momentum 0.9), AdamW or SGD (momentum 0.9, Nesterov) over ``param_groups``."""
    if name == "lars":
        return LARS(param_groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r} is not one of lars, adamw, sgd")


def scaled_lr(base_lr: float, global_batch_size: int, scaling: str) -> float:
    """SimCLR's rule: lr = base_lr x batch/256 (``linear``) or x sqrt(batch) / ... (``sqrt``: base x sqrt(batch/256))."""
    if scaling == "linear":
        return base_lr * global_batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch_size / 256)
    return base_lr


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int, peak_lr: float,
           final_lr: float) -> float:
    lr = warmup_cosine(step, total_steps, warmup_steps, peak_lr, final_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite."""


class NonFiniteGuard:
    """Tracks, on the device and without a host sync per step, the first step whose loss was not finite and
    the last finite loss before it; ``check`` (called at the logging interval) raises ``NonFiniteLossError``.
    """

    def __init__(self, device: torch.device, what: str) -> None:
        self.what = what
        self.first_bad_step = torch.tensor(-1, device=device)
        self.last_finite_loss = torch.tensor(float("nan"), device=device)

    def update(self, step: int, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        clean_so_far = self.first_bad_step < 0
        self.last_finite_loss = torch.where(finite & clean_so_far, loss, self.last_finite_loss)
        # A Python scalar, not torch.tensor(step, device=...): that would be a blocking host-to-device copy per step.
        self.first_bad_step = torch.where(~finite & clean_so_far, step, self.first_bad_step)

    def check(self) -> None:
        bad_step = int(self.first_bad_step)
        if bad_step >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at step {bad_step} ({self.what}); last finite loss: {float(self.last_finite_loss):.6g}"
            )


def load_checkpoint_state() -> dict[str, Any] | None:
    """The state saved in the latest Ray Train checkpoint of this run, or None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def report(metrics: dict[str, float], state: dict[str, Any] | None, rank: int) -> None:
    """``ray.train.report`` from every worker (it is a barrier); rank 0 attaches ``state`` as the checkpoint."""
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
