"""One optimisation step of any objective, and the pieces every training loop shares (plain PyTorch, no Ray).

``TrainStep`` is the step that pretraining, fine-tuning, distillation and the throughput benchmark all run; each
passes its own objective ``objective(model, batch, generator) -> StepOutput``:

- ``ssl_objective(views, device)``: augmented views of ``batch["image"]``, then the method's ``training_step``;
- fine-tuning and distillation build theirs from a classifier and ``batch["label"]``.

RNG is a pure function of (seed, epoch, rank) (``seed_epoch``) and the learning rate a pure function of the step,
so a run resumed from a checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.device import views_to_memory_format
from ssl_core.methods import StepOutput
from ssl_core.methods.base import ROW_INDEX
from ssl_core.views import ViewGenerator

Objective = Callable[[nn.Module, dict[str, Tensor], torch.Generator], StepOutput]
"""``objective(model, batch, generator) -> StepOutput``: the loss of one batch (``{"image": uint8 (B, 3, S, S),
"label": int64 (B,)}``) through ``model`` (the module being trained, possibly DDP- or compile-wrapped)."""


def seed_epoch(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seed torch's global RNG and return the augmentation generator for (seed, epoch, rank).

    RNG is a pure function of the epoch, so a run resumed from a checkpoint draws the same augmentations as
    an uninterrupted one, without saving generator state.
    """
    key = (seed * 1_000_003 + epoch) * 4099 + rank
    torch.manual_seed(key)
    return torch.Generator().manual_seed(key)


@dataclass(frozen=True)
class BatchPlan:
    per_worker_batch: int
    steps_per_epoch: int
    reduced: bool


def batch_plan(rows: int, batch_size: int, world_size: int, what: str, *, shrink: bool) -> BatchPlan:
    """Per-worker batch and steps per epoch such that every worker takes the same number of full batches.

    ``batch_size`` (named ``what`` in errors) is per worker. When ``rows`` cannot fill one global batch, the
    per-worker batch shrinks to ``rows // world_size`` (``reduced``) if ``shrink``, else ``ValueError``; fewer
    than 2 rows per worker (batch norm needs 2) raise ``ValueError``.
    """
    per_worker = batch_size
    if rows < batch_size * world_size:
        if not shrink:
            raise ValueError(f"{what}={batch_size} x {world_size} workers exceeds the {rows} train rows")
        per_worker = rows // world_size
        if per_worker < 2:
            raise ValueError(f"{what}: {rows} rows cannot give each of {world_size} workers a batch of at least 2")
    return BatchPlan(per_worker, rows // (per_worker * world_size), per_worker != batch_size)


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; ``fp32`` and ``bf16`` as given (bf16 on a CPU without
    native bf16 instructions (avx512_bf16 / AMX) still runs, emulated, and is then slower than fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def precision_autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """``torch.autocast(device.type, dtype=torch.bfloat16)`` when ``resolve_precision`` says bf16, else nothing:
    matmuls and convolutions run in bf16, reductions and losses autocast keeps in float32 stay there."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


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

    def update(self, step: int, loss: Tensor) -> None:
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


def ssl_objective(views: ViewGenerator, device: torch.device) -> Objective:
    """Pretraining: the method's views of ``batch["image"]`` on ``device`` (channels_last where the device uses
    it), through ``model`` (the method or its wrapper: ``forward`` is ``training_step``). A batch's
    ``"row_index"`` (each image's training row, from the pipeline's reader) joins the views under that key, for
    the memory-bank methods."""

    def objective(model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> StepOutput:
        step_views = views_to_memory_format(views(batch["image"], generator), device)
        if ROW_INDEX in batch:
            step_views[ROW_INDEX] = batch[ROW_INDEX].to(device=device, dtype=torch.long)
        return model(step_views)

    return objective


class TrainStep:
    """One optimisation step of ``objective`` on ``model``::

        lr = lr_at(step); loss = objective(model, batch, generator) under precision_autocast(device, precision)
        zero_grad; loss.backward(); clip the gradient norm to grad_clip; optimizer.step(); after_step(step)

    then ``guard.update`` (the non-finite loss guard; ``guard.check()`` is the only host sync). Returns the
    detached ``StepOutput`` and the learning rate used.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        lr_at: Callable[[int], float],
        *,
        device: torch.device,
        what: str,
        grad_clip: float | None = None,
        after_step: Callable[[int], None] | None = None,
        precision: str = "auto",
    ) -> None:
        self.model, self.objective, self.optimizer, self.lr_at = model, objective, optimizer, lr_at
        self.precision = resolve_precision(precision, device)
        self.device, self.grad_clip, self.after_step = device, grad_clip, after_step
        self.guard = NonFiniteGuard(device, what)

    def __call__(self, batch: dict[str, Tensor], step: int, generator: torch.Generator) -> tuple[StepOutput, float]:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with precision_autocast(self.device, self.precision):
            out = self.objective(self.model, batch, generator)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step(step)
        loss = out.loss.detach()
        self.guard.update(step, loss)
        return StepOutput(loss, {name: value.detach() for name, value in out.logs.items()}), lr
