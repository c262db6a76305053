"""The one worker loop of every training stage (pretrain, finetune, distill), run on each Ray Train worker.

``train(model, objective, spec, info, ...)``:

- resume: the latest Ray Train checkpoint of this run restores the model, the optimizer, the epoch and the step
  (schedules and RNG are functions of the step and the epoch, so the run continues as if never stopped);
- per epoch: stream this worker's ``"train"`` dataset shard (same number of full batches on every worker), one
  ``ssl_core.training.TrainStep`` of the stage's ``objective`` per batch, the non-finite loss guard checked every
  ``check_every_steps``;
- end of epoch: rank 0 adds the stage's ``epoch_metrics`` (e.g. the kNN monitor), prints one line and logs to
  MLflow per step ``train_loss``, ``lr`` and the objective's ``StepOutput.logs``, per epoch ``epoch_<metric>``;
  every worker calls ``ray.train.report`` (a barrier), rank 0 with a checkpoint every ``checkpoint_every`` epochs
  and after the last;
- progress for the driver's console (``pipelines.console``): rank 0 logs ``epochs_total`` at start and
  ``epochs_done`` per epoch; every worker logs MLflow's system metrics as ``system/rank<N>/...``
  (``tracking.system_metrics``).

Ray calls are limited to ``get_context``, ``get_checkpoint``, ``get_dataset_shard``, ``report`` and
``torch.prepare_model``; MLflow is written by rank 0 only, through ``pipelines.tracking``.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from pipelines import tracking
from pipelines.config import TrackingConfig
from pipelines.console import EPOCHS_DONE, EPOCHS_TOTAL
from ssl_core import optim
from ssl_core.device import compile_or_eager, model_to_memory_format
from ssl_core.training import BatchPlan, Objective, TrainStep, seed_epoch

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def worker_threads(cpus_per_worker: float, torch_threads: int = 0) -> int:
    """Torch intra-op threads of a CPU worker: ``torch_threads`` when positive, else ``max(1, floor(cpus_per_worker))``.

    The one rule (measured in ``benchmarks/threads.py``): a worker computes on at most the whole cores Ray reserved
    for it. A fractional rest (``cpus_per_worker: 1.5``) is not worth a second thread: that thread competes with the
    Ray Data readers (``READ_CPUS`` tasks on what the workers leave of the node) and Ray's own processes, and the
    worker then waits for its batches.
    """
    return torch_threads if torch_threads > 0 else max(1, math.floor(cpus_per_worker))


def worker_info(cpus_per_worker: float, torch_threads: int = 0, stage: str = "train") -> WorkerInfo:
    """Rank, world size and device of this Ray Train worker; a CPU worker sets its torch threads
    (``worker_threads``) and rank 0 prints them once, naming ``stage``."""
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    info = WorkerInfo(context.get_world_rank(), context.get_world_size(), device)
    if device.type == "cpu":
        threads = worker_threads(cpus_per_worker, torch_threads)
        torch.set_num_threads(threads)
        if info.is_chief:
            rule = "scaling.torch_threads" if torch_threads > 0 else \
                f"floor(scaling.cpus_per_worker={cpus_per_worker:g}), at least 1"
            print(f"[{stage}] {info.world_size} CPU worker(s), {threads} torch thread(s) each ({rule})", flush=True)
    return info


@dataclass(frozen=True)
class LoopSpec:
    """What the loop runs, the same on every worker. The learning rate warms up linearly over ``warmup_steps``
    to ``lr``, then follows a cosine to ``final_lr`` (``ssl_core.optim.warmup_cosine``)."""

    stage: str
    """Names the loop in printed lines (``[pretrain] epoch 1/15 ...``)."""
    what: str
    """Names the objective in a non-finite-loss error (``method simclr``)."""
    epochs: int
    rows: int
    """Rows of the dataset the workers' shards split; bounds the shuffle buffer."""
    batch: BatchPlan
    seed: int
    optimizer: str
    lr: float
    weight_decay: float
    warmup_steps: int = 0
    final_lr: float = 0.0
    grad_clip: float | None = None
    checkpoint_every: int = 1
    check_every_steps: int = 50
    compile: bool = False
    nan_at_step: int | None = None
    """Test hook: the batch of this step is made NaN (``pretrain.inject_nan_at_step``)."""

    @property
    def total_steps(self) -> int:
        return self.batch.steps_per_epoch * self.epochs


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


def train(
    model: nn.Module,
    objective: Objective,
    spec: LoopSpec,
    info: WorkerInfo,
    *,
    tracking_config: TrackingConfig,
    run_id: str | None,
    param_groups: list[dict[str, Any]] | None = None,
    after_step: Callable[[int, int], None] | None = None,
    epoch_metrics: Callable[[int], dict[str, float]] | None = None,
    before_epoch: Callable[[int], None] | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Train ``model`` (see the module docstring); returns it and the last epoch's metrics (``epoch``, ``step``,
    ``loss``, ``images_per_second`` and those of ``epoch_metrics``).

    ``param_groups`` default to ``ssl_core.optim.param_groups(model, spec.weight_decay)``; ``after_step(step,
    total_steps)`` runs after each optimizer step (EMA teachers, queues); ``epoch_metrics(epoch)`` runs on rank 0
    after each epoch (1-based); ``before_epoch(epoch)`` (0-based) on every worker before it.
    """
    state = load_checkpoint_state()
    if state is not None:
        model.load_state_dict(state["model"])
    model = model_to_memory_format(model, info.device)
    wrapped = ray.train.torch.prepare_model(model)
    if spec.compile:
        wrapped = compile_or_eager(wrapped)
    groups = param_groups if param_groups is not None else optim.param_groups(model, spec.weight_decay)
    optimizer = optim.build_optimizer(groups, spec.optimizer, spec.lr, spec.weight_decay)
    start_epoch, step = 0, 0
    log = _EpochLog(spec, info, tracking_config, run_id)
    if state is None:
        log.plan()
    else:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        log.resumed(step, start_epoch)
    lr_at = partial(optim.warmup_cosine, total_steps=spec.total_steps, warmup_steps=spec.warmup_steps,
                    base_value=spec.lr, final_value=spec.final_lr)
    train_step = TrainStep(wrapped, objective, optimizer, lr_at, device=info.device, what=spec.what,
                           grad_clip=spec.grad_clip,
                           after_step=None if after_step is None else partial(after_step, total_steps=spec.total_steps))
    shard = ray.train.get_dataset_shard("train")
    batch_size, steps_per_epoch = spec.batch.per_worker_batch, spec.batch.steps_per_epoch
    metrics: dict[str, float] = {}
    with tracking.system_metrics(tracking_config, run_id, f"rank{info.rank}"):  # CPU/GPU/memory per worker
        for epoch in range(start_epoch, spec.epochs):
            if before_epoch is not None:
                before_epoch(epoch)
            generator = seed_epoch(spec.seed, epoch, info.rank)
            rows: list[tuple[int, dict[str, torch.Tensor], float]] = []
            loss_sum = torch.zeros((), device=info.device)
            started = time.perf_counter()
            batches = shard.iter_torch_batches(
                batch_size=batch_size, drop_last=True, device=info.device, pin_memory=info.device.type == "cuda",
                local_shuffle_buffer_size=min(4 * batch_size, spec.rows), local_shuffle_seed=spec.seed + epoch,
            )
            for index, batch in enumerate(batches):
                if index == steps_per_epoch:
                    break
                if step == spec.nan_at_step:
                    batch = {**batch, "image": batch["image"].float() * float("nan")}
                out, lr = train_step(batch, step, generator)
                loss_sum += out.loss
                rows.append((step, {"train_loss": out.loss, **out.logs}, lr))
                step += 1
                if step % spec.check_every_steps == 0:
                    train_step.guard.check()
            train_step.guard.check()
            seconds = time.perf_counter() - started
            metrics = {
                "epoch": epoch + 1,
                "step": step,
                "loss": float(loss_sum) / max(1, len(rows)),
                "images_per_second": len(rows) * batch_size * info.world_size / seconds,
            }
            checkpoint_due = (epoch + 1) % spec.checkpoint_every == 0 or epoch + 1 == spec.epochs
            checkpoint = None
            if info.is_chief:
                if epoch_metrics is not None:
                    metrics.update(epoch_metrics(epoch + 1))
                log.epoch(rows, metrics)
                if checkpoint_due:
                    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "epoch": epoch + 1, "step": step}
            report(metrics, checkpoint, info.rank)
    return model, metrics


class _EpochLog:
    """Rank 0's printed lines and MLflow rows of the loop (nothing on other ranks, no MLflow without a run id)."""

    def __init__(self, spec: LoopSpec, info: WorkerInfo, tracking_config: TrackingConfig, run_id: str | None) -> None:
        self.spec, self.active, self.tracking, self.run_id = spec, info.is_chief, tracking_config, run_id
        self.world_size = info.world_size

    def _log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        if self.active and self.run_id is not None:
            tracking.log_metrics(self.tracking, self.run_id, rows)

    def plan(self) -> None:
        batch = self.spec.batch
        if self.active and batch.reduced:
            print(f"[{self.spec.stage}] {self.spec.rows} rows cannot fill {self.world_size} x {self.spec.stage}"
                  f".batch_size: using {batch.per_worker_batch} per worker", flush=True)
        self._log([(0, {"per_worker_batch_size": batch.per_worker_batch, "steps_per_epoch": batch.steps_per_epoch,
                        EPOCHS_TOTAL: self.spec.epochs})])

    def resumed(self, step: int, epoch: int) -> None:
        self._log([(step, {"resumed_from_epoch": epoch, EPOCHS_TOTAL: self.spec.epochs})])

    def epoch(self, rows: list[tuple[int, dict[str, torch.Tensor], float]], metrics: dict[str, float]) -> None:
        extra = "".join(f"  {name} {value:.4f}" for name, value in metrics.items()
                        if name not in ("epoch", "step", "loss", "images_per_second"))
        print(f"[{self.spec.stage}] epoch {metrics['epoch']}/{self.spec.epochs}  loss {metrics['loss']:.4f}  "
              f"images/s {metrics['images_per_second']:.1f}{extra}", flush=True)
        step_rows = [(step, {**{name: float(value) for name, value in values.items()}, "lr": lr})
                     for step, values, lr in rows]
        epoch_values = {f"epoch_{name}": value for name, value in metrics.items() if name not in ("epoch", "step")}
        epoch_values[EPOCHS_DONE] = metrics["epoch"]  # what the driver's progress bar reads (pipelines.console)
        self._log([*step_rows, (int(metrics["epoch"]), epoch_values)])
