"""The one worker loop of every training stage (pretrain, finetune, distill), run on each Ray Train worker.

``train(model, objective, spec, info, ...)``:

- resume: the newest checkpoint of this Train run that loads (``load_checkpoint_state``) restores the model, the
  optimizer, the epoch and the step (schedules and RNG are functions of the step and the epoch, so the run
  continues as if never stopped);
- per epoch: stream this worker's ``"train"`` dataset shard (same number of full batches on every worker), one
  ``ssl_core.training.TrainStep`` of the stage's ``objective`` per batch, the non-finite loss guard checked every
  ``check_every_steps``;
- end of epoch: rank 0 adds the stage's ``epoch_metrics`` (e.g. the kNN monitor), prints one line and logs to
  MLflow per step ``train_loss``, ``lr`` and the objective's ``StepOutput.logs``, per epoch ``epoch_<metric>``;
  every worker calls ``ray.train.report`` (a barrier), rank 0 with a checkpoint every ``checkpoint_every`` epochs
  and after the last;
- a time budget (``LoopSpec.budget_seconds``, ``ssl_core.budget.EpochBudget``): the learning rate and
  ``after_step``'s schedules span the projected run, re-projected after 3 steps and after each epoch from the
  measured pace on rank 0's clock (broadcast, so every rank projects and stops alike); the loop stops at the end of
  the epoch that would otherwise cross the budget, checkpoints it, and logs ``budget_used_s`` and
  ``epochs_projected`` per epoch (``epochs_total`` follows the projection); the budget used travels in the
  checkpoint, so a resumed run spends only what is left;
- progress for the driver's console (``pipelines.console``): rank 0 logs ``epochs_total`` and
  ``steps_per_epoch`` at start, ``epochs_done`` per epoch, and within an epoch a ``progress_*`` row at most every
  ``PROGRESS_INTERVAL_SECONDS`` (``console.StepProgress``: one small write per interval, never one per step);
  every worker logs MLflow's system metrics as ``system/rank<N>/...``
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
from pathlib import Path
from typing import Any, Protocol

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from pipelines import storage, tracking
from pipelines.config import TrackingConfig
from pipelines.console import EPOCHS_DONE, EPOCHS_TOTAL, PROGRESS_STEP, STEPS_PER_EPOCH, StepProgress
from pipelines.checkpoints import CHECKPOINT_FILE, latest_valid_checkpoint
from pipelines.host_memory import retains_freed_memory
from ssl_core import optim
from ssl_core.budget import CALIBRATION_STEPS, EpochBudget
from ssl_core.device import compile_or_eager, model_to_memory_format
from ssl_core.training import BatchPlan, Objective, TrainStep, seed_epoch

EPOCHS_PROJECTED = "epochs_projected"
"""Per-epoch metric of a budgeted run: the epochs its schedules now span (``ssl_core.budget.EpochBudget``)."""


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
            memory = "freed memory retained" if retains_freed_memory() else "glibc's malloc defaults"
            print(f"[{stage}] {info.world_size} CPU worker(s), {threads} torch thread(s) each ({rule}), {memory}",
                  flush=True)
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
    """Test hook: the batch of this step is made NaN (``pipelines.faults``: ``pretrain_nan_at_step``)."""
    budget_seconds: float | None = None
    """Wall-clock budget (``ssl_core.budget.EpochBudget``, ``epochs`` the cap); None: run ``epochs``."""
    precision: str = "auto"
    """The step's autocast (``ssl_core.training.precision_autocast``)."""
    storage_path: str | None = None
    """The Train runs' storage root (``scaling.storage_path``): a restarted worker group resumes from the newest
    checkpoint under ``<storage_path>/<Train run name>`` that loads (``load_checkpoint_state``)."""

    @property
    def total_steps(self) -> int:
        return self.batch.steps_per_epoch * self.epochs


def _from_rank0(values: list[float], device: torch.device) -> list[float]:
    """``values`` as rank 0 holds them, on every rank (a broadcast under DDP; as given in one process), so that a
    budget's projection and stop decision are the same on every worker."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def load_checkpoint_state(resume_from: str | None = None, storage_path: str | None = None,
                          warn: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The state to start from, the first that exists of:

    1. the newest checkpoint of this Train run under ``<storage_path>/<run name>`` that loads
       (``pipelines.checkpoints.latest_valid_checkpoint``; each one that does not load goes to ``warn``). It is written
       before ``ray.train.report`` returns but registered by Ray's controller only when it next polls the workers,
       so a worker group lost in between restarts with ``ray.train.get_checkpoint()`` one checkpoint behind;
    2. Ray's latest registered checkpoint of this run (``storage_path`` None, or nothing there loads);
    3. the checkpoint folder ``resume_from`` (path or URI: an earlier attempt's, chosen by ``pipelines.resume``);

    None on a fresh start."""
    if storage_path is not None:
        run_folder = storage.locate(storage_path).child(ray.train.get_context().get_experiment_name())
        found = latest_valid_checkpoint(run_folder, warn)
        if found is not None:
            return found[1]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from is not None:
        checkpoint = ray.train.Checkpoint(resume_from)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


class Stateful(Protocol):
    """What ``train(stateful=...)`` checkpoints: ``state_dict()`` of plain tensors and numbers, and its inverse."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def gather_states(stateful: Stateful | None, info: WorkerInfo) -> list[dict[str, Any]] | None:
    """``[rank 0's state_dict(), rank 1's, ...]`` on every rank (``all_gather_object``: each rank holds its own part,
    e.g. its slice of the unlabeled pool); None without ``stateful``."""
    if stateful is None:
        return None
    state = stateful.state_dict()
    if info.world_size == 1 or not dist.is_initialized():
        return [state]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def restore_state(stateful: Stateful | None, states: list[dict[str, Any]] | None, info: WorkerInfo) -> None:
    """Give ``stateful`` this rank's checkpointed state. A checkpoint without one (written before it was saved) or
    from another number of workers leaves it fresh, with a printed line: the model and optimizer still resume."""
    if stateful is None:
        return
    if states is None or len(states) != info.world_size:
        found = "no state" if states is None else f"the state of {len(states)} workers"
        print(f"rank {info.rank}: the checkpoint holds {found} for {info.world_size} workers: the objective's state "
              "starts fresh", flush=True)
        return
    stateful.load_state_dict(states[info.rank])


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
    epoch_metrics: Callable[[int, bool], dict[str, float]] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    resume_from: str | None = None,
    stateful: Stateful | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Train ``model`` (see the module docstring); returns it and the last epoch's metrics (``epoch``, ``step``,
    ``loss``, ``images_per_second`` and those of ``epoch_metrics``).

    ``param_groups`` default to ``ssl_core.optim.param_groups(model, spec.weight_decay)``; ``after_step(step,
    total_steps)`` runs after each optimizer step (EMA teachers, queues; ``total_steps``: the projected run's);
    ``epoch_metrics(epoch, final)`` runs on rank 0 after each epoch (1-based; ``final``: the run stops after it, at
    ``spec.epochs`` or at the budget); ``before_epoch(epoch)`` (0-based) on every worker before it. ``resume_from``: the
    checkpoint folder to start from when this Train run has none of its own (``load_checkpoint_state``).
    ``stateful``: state beside the model that a resumed run needs (the semi-supervised objective's temporal
    ensemble, mean teacher, step); every rank's ``state_dict()`` is checkpointed (``gather_states``) and each rank
    restores its own.
    """
    def warn(message: str) -> None:
        if info.is_chief:
            print(f"[{spec.stage}] warning: {message}", flush=True)

    state = load_checkpoint_state(resume_from, spec.storage_path, warn)
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
        restore_state(stateful, state.get("stateful"), info)
        log.resumed(step, start_epoch)
    budget = EpochBudget(spec.budget_seconds, spec.batch.steps_per_epoch, spec.epochs, spec.warmup_steps)
    budget_used = float(state.get("budget_used_s", 0.0)) if state is not None else 0.0
    if state is not None and start_epoch > 0 and not budget.end_epoch(start_epoch, budget_used):
        start_epoch = spec.epochs  # resumed with the budget spent: nothing left to run

    def lr_at(at_step: int) -> float:  # schedules span the projected run (budget.total_steps), read at every step
        return optim.warmup_cosine(at_step, total_steps=budget.total_steps, warmup_steps=budget.warmup_steps,
                                   base_value=spec.lr, final_value=spec.final_lr)

    def after_optimizer_step(at_step: int) -> None:
        after_step(at_step, total_steps=budget.total_steps)

    train_step = TrainStep(wrapped, objective, optimizer, lr_at, device=info.device, what=spec.what,
                           grad_clip=spec.grad_clip, after_step=None if after_step is None else after_optimizer_step,
                           precision=spec.precision)
    shard = ray.train.get_dataset_shard("train")
    batch_size, steps_per_epoch = spec.batch.per_worker_batch, spec.batch.steps_per_epoch
    metrics: dict[str, float] = {}
    step_progress = StepProgress(time.perf_counter())
    budget_started = time.perf_counter() - budget_used
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
                if log.writes_mlflow and step_progress.due(now := time.perf_counter(), step):
                    log.progress(step_progress.row(now, step, len(rows), now - started,
                                                   batch_size * info.world_size, float(loss_sum)))
                if step % spec.check_every_steps == 0:
                    train_step.guard.check()
                if epoch == 0 and spec.budget_seconds is not None and len(rows) == CALIBRATION_STEPS:
                    budget.observe_steps(len(rows), time.perf_counter() - budget_started)
                    budget.set_decision(True, int(_from_rank0([budget.projected_epochs], info.device)[0]))
            train_step.guard.check()
            budget_used = time.perf_counter() - budget_started
            go_on = budget.end_epoch(epoch + 1, budget_used)
            if spec.budget_seconds is not None:  # rank 0's clock decides for every rank
                go_on, projected = _from_rank0([float(go_on), budget.projected_epochs], info.device)
                budget.set_decision(bool(go_on), int(projected))
            final = budget.stopped
            seconds = time.perf_counter() - started
            metrics = {
                "epoch": epoch + 1,
                "step": step,
                "loss": float(loss_sum) / max(1, len(rows)),
                "images_per_second": len(rows) * batch_size * info.world_size / seconds,
            }
            if spec.budget_seconds is not None:
                metrics.update({"budget_used_s": budget_used, EPOCHS_PROJECTED: budget.projected_epochs})
            checkpoint_due = (epoch + 1) % spec.checkpoint_every == 0 or final
            checkpoint = None
            states = gather_states(stateful, info) if checkpoint_due else None  # a collective: every rank calls it
            if info.is_chief:
                if epoch_metrics is not None:
                    metrics.update(epoch_metrics(epoch + 1, final))
                log.epoch(rows, metrics)
                if budget.first_epoch_over:
                    print(f"[{spec.stage}] the first epoch alone took {budget_used:.0f} s, over the budget of "
                          f"{spec.budget_seconds:.0f} s: stopped after it (a run has at least one epoch)", flush=True)
                if checkpoint_due:
                    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "epoch": epoch + 1, "step": step, "budget_used_s": budget_used,
                                  **({} if states is None else {"stateful": states})}
            report(metrics, checkpoint, info.rank)
            if final:
                break
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
        self._log([(0, {"per_worker_batch_size": batch.per_worker_batch, STEPS_PER_EPOCH: batch.steps_per_epoch,
                        EPOCHS_TOTAL: self.spec.epochs})])

    def resumed(self, step: int, epoch: int) -> None:
        self._log([(step, {"resumed_from_epoch": epoch, EPOCHS_TOTAL: self.spec.epochs,
                           STEPS_PER_EPOCH: self.spec.batch.steps_per_epoch})])

    @property
    def writes_mlflow(self) -> bool:
        """Whether this worker writes to MLflow (rank 0 of a run with an MLflow run)."""
        return self.active and self.run_id is not None

    def progress(self, row: dict[str, float]) -> None:
        """The console's step progress (``console.StepProgress.row``), at its step."""
        self._log([(int(row[PROGRESS_STEP]), row)])

    def epoch(self, rows: list[tuple[int, dict[str, torch.Tensor], float]], metrics: dict[str, float]) -> None:
        extra = "".join(f"  {name} {value:.4f}" for name, value in metrics.items()
                        if name not in ("epoch", "step", "loss", "images_per_second"))
        print(f"[{self.spec.stage}] epoch {metrics['epoch']}/{self.spec.epochs}  loss {metrics['loss']:.4f}  "
              f"images/s {metrics['images_per_second']:.1f}{extra}", flush=True)
        step_rows = [(step, {**{name: float(value) for name, value in values.items()}, "lr": lr})
                     for step, values, lr in rows]
        epoch_values = {f"epoch_{name}": value for name, value in metrics.items() if name not in ("epoch", "step")}
        epoch_values[EPOCHS_DONE] = metrics["epoch"]  # what the driver's progress bar reads (pipelines.console)
        if EPOCHS_PROJECTED in metrics:  # a budgeted run: the bar's length is the projection, not the cap
            epoch_values[EPOCHS_TOTAL] = metrics[EPOCHS_PROJECTED]
        self._log([*step_rows, (int(metrics["epoch"]), epoch_values)])
