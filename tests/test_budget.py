"""``pretrain.budget_minutes``: the projection and stop rule (``ssl_core.budget.EpochBudget``) on a clock the test
controls, driving the pipeline's real training step, and one budgeted 2-worker pretraining on real Ray + MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from pipelines import tracking
from pipelines.config import config_from_mapping
from pipelines.datasets import read_manifest
from pipelines.stages import pretrain
from pipelines.stages.ingest import ingest
from ssl_core.budget import EpochBudget
from ssl_core.methods import StepOutput
from ssl_core.optim import warmup_cosine
from ssl_core.training import TrainStep

PEAK_LR = 0.1


def budgeted_run(budget_seconds: float, step_seconds: list[float], steps_per_epoch: int = 10, max_epochs: int = 5,
                 warmup_steps: int = 10) -> tuple[EpochBudget, list[float], float]:
    """Train a tiny linear model with the pipeline's ``TrainStep`` under ``EpochBudget``, as ``pipelines.train_loop``
    drives it, on a clock that advances ``step_seconds[epoch]`` per step. Returns the budget, the lr of every step
    and the seconds used."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    budget = EpochBudget(budget_seconds, steps_per_epoch, max_epochs, warmup_steps)
    lrs: list[float] = []

    def lr_at(step: int) -> float:
        lr = warmup_cosine(step, budget.total_steps, budget.warmup_steps, PEAK_LR)
        lrs.append(lr)
        return lr

    def objective(module: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepOutput:
        return StepOutput(module(batch["x"]).pow(2).mean())

    train_step = TrainStep(model, objective, torch.optim.SGD(model.parameters(), lr=PEAK_LR), lr_at,
                           device=torch.device("cpu"), what="test")
    clock, step, epoch = 0.0, 0, 0
    while True:
        for index in range(steps_per_epoch):
            train_step({"x": torch.randn(8, 4)}, step, torch.Generator())
            clock += step_seconds[epoch]
            step += 1
            if epoch == 0:
                budget.observe_steps(index + 1, clock)
        epoch += 1
        if not budget.end_epoch(epoch, clock):
            return budget, lrs, clock


def test_a_budget_that_fits_two_of_five_epochs_stops_after_two_with_the_schedule_run_to_its_end() -> None:
    # 10 steps of 4 s: 40 s an epoch; 100 s fit 2 epochs (a third would end at 120 s).
    budget, lrs, used = budgeted_run(100.0, [4.0] * 5)
    assert (budget.epochs_done, budget.projected_epochs, len(lrs)) == (2, 2, 20)
    assert used <= 100.0 and not budget.first_epoch_over
    # Projected after 3 steps (2 epochs, not the 5 configured): the warm-up keeps its share (10 of 50 -> 4 of 20)
    # and the cosine ends at the last step taken: within 1% of the peak there (exactly (1 + cos(pi 15/16)) / 2).
    assert lrs[4] == pytest.approx(PEAK_LR)
    assert lrs[-1] == pytest.approx(PEAK_LR * (1 + math.cos(math.pi * 15 / 16)) / 2)
    assert lrs[-1] < 0.01 * PEAK_LR
    assert max(lrs) == pytest.approx(PEAK_LR)


def test_steps_that_slow_down_stop_the_run_before_it_crosses_the_budget() -> None:
    # Epoch 1: 40 s -> 3 epochs projected for 130 s; epoch 2 takes 80 s (mean 60 s): a third would end past 130 s.
    budget, lrs, used = budgeted_run(130.0, [4.0, 8.0, 8.0, 8.0, 8.0])
    assert (budget.epochs_done, len(lrs)) == (2, 20)
    assert used == pytest.approx(120.0) and used <= 130.0
    assert budget.total_steps == 20  # the projection ends where the run ended


def test_without_a_budget_the_run_has_its_configured_epochs_and_warmup() -> None:
    budget, lrs, _ = budgeted_run(None, [1.0] * 5)  # type: ignore[arg-type]
    assert (budget.epochs_done, len(lrs), budget.warmup_steps) == (5, 50, 10)
    assert lrs == [warmup_cosine(step, 50, 10, PEAK_LR) for step in range(50)]


def test_a_first_epoch_longer_than_the_budget_still_runs_once_and_says_so() -> None:
    budget, lrs, used = budgeted_run(15.0, [4.0] * 5)
    assert (budget.epochs_done, len(lrs), budget.first_epoch_over) == (1, 10, True)
    assert lrs[-1] < 0.05 * PEAK_LR  # projected to one epoch after 3 steps


@pytest.mark.parametrize("key, value", [("pretrain", {"budget_minutes": -1}), ("pretrain", {"budget_minutes": "x"}),
                                        ("tune", {"trial_budget_minutes": 0})])
def test_a_bad_budget_is_refused_naming_its_key(key: str, value: dict) -> None:
    with pytest.raises(ValueError, match=f"{key}.{next(iter(value))}"):
        config_from_mapping({key: value})


def test_a_tune_trial_pretrains_within_the_trial_budget_not_the_pretrain_one() -> None:
    from pipelines.stages.tune import trial_overlay

    cfg = config_from_mapping({"tune": {"trial_budget_minutes": 2, "epochs": 4},
                               "pretrain": {"budget_minutes": 60, "warmup_epochs": 1}})
    trial = cfg.with_overlay(trial_overlay(cfg))
    assert (trial.pretrain.budget_minutes, trial.pretrain.epochs) == (2, 4)
    untimed = config_from_mapping({"tune": {"epochs": 4}, "pretrain": {"budget_minutes": 60, "warmup_epochs": 1}})
    assert untimed.with_overlay(trial_overlay(untimed)).pretrain.budget_minutes is None


@pytest.mark.slow
def test_a_budgeted_two_worker_pretraining_stops_together_and_logs_the_budget(ray_session, tmp_path: Path) -> None:
    """A budget far below one epoch: both workers stop after epoch 1 of 5 (a rank that went on would hang the run
    at its next report), the schedules span that one epoch, and the run logs what it used. The method is rotation
    (no projection head): its per-step ``StepOutput.logs`` reach MLflow at every step."""
    data = tmp_path / "digits"
    ingest("builtin:digits", data)
    cfg = config_from_mapping({
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "artifacts")},
        "data": {"path": str(data), "image_size": 16},
        "method": {"name": "rotation", "config": {"backbone": "resnet8", "hidden_dim": 16}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "storage_path": str(tmp_path / "runs")},
        "pretrain": {"epochs": 5, "batch_size": 128, "optimizer": "adamw", "lr": 2e-3, "warmup_epochs": 1,
                     "budget_minutes": 0.0005, "knn_every": 100, "log_every_steps": 2},
        "finetune": {"head_layers": 0},
    }, base=tmp_path)
    with tracking.run(cfg.tracking, "pretrain", {tracking.STAGE_TAG: "pretrain"}, params=cfg.to_dict()) as run_id:
        pretrain.run(cfg, run_id, {})
    client = MlflowClient(cfg.tracking.uri)
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
               for key in ("lr", "epochs_done", "epochs_total", "epoch_budget_used_s", "epoch_epochs_projected",
                           "epoch_knn_top1", "rotation_accuracy")}
    steps_per_epoch = read_manifest(data)["splits"]["train"]["rows"] // 256
    assert [value for _, value in history["epochs_done"]] == [1]
    assert len(history["lr"]) == steps_per_epoch
    assert history["epochs_total"][-1][1] == 1 and history["epoch_epochs_projected"] == [(1, 1)]
    assert history["epoch_budget_used_s"][0][1] > 0.03  # the first epoch alone was over the 0.03 s budget
    assert history["lr"][-1][1] < 0.2 * 2e-3  # cosine to 0 over the 1 projected epoch, not the 5 configured
    assert history["epoch_knn_top1"]  # the monitor runs on the final epoch even off its knn_every
    accuracy = history["rotation_accuracy"]  # a method's own per-step logs, at every step
    assert [s for s, _ in accuracy] == list(range(steps_per_epoch)) and all(0.0 <= v <= 1.0 for _, v in accuracy)
