"""Tune stage: a Ray Tune search over a method's hyperparameters, short pretraining runs scored by kNN top-1.

Each trial is a Tune function trainable that acts as a Ray Train driver (the Train V2 pattern): it opens an
MLflow run nested under the stage's run and runs ``pipelines.pretraining`` with ``TuneReportCallback``, so rank
0's per-epoch metrics (``knn_top1``) reach Tune and ASHA. Trials pack onto the cluster: each asks for
``tune.num_workers`` Train workers of ``tune.cpus_per_worker`` (+ GPUs), its trainable 0.1 CPU, and
``max_concurrent_trials`` bounds how many run at once (0: as many as the cluster holds, counting one free CPU
per trial for its Ray Data readers).

After the search the driver classifies every trial (completed / stopped early / errored, with the reason),
closes its MLflow run, and logs on the stage's run: the best overlay, a results table (CSV, best first), and a
plot of the metric against each searched parameter. Best = Ray's ``ResultGrid.get_best_result`` over each
trial's last reported metric (ties: the earliest trial). The record's ``config_overlay`` is applied to the
pretrain stage's config by the DAG.

The same code runs the fine-tune search (stage ``tune_finetune``, ``tune.finetune``; its inputs hold the pretrain
record): each trial fine-tunes the pretrain checkpoint (``pipelines.finetuning.fit_finetune_trial``) on
``finetune.label_fraction`` for ``tune.epochs`` and reports ``val_top1`` per epoch; the space is
``pipelines.config.finetune_search_space``; the best overlay (``{"finetune": {"semi": ...}}``) feeds finetune.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines import faults, tracking
from pipelines.config import PipelineConfig, finetune_search_space, search_space
from pipelines.datasets import read_manifest
from pipelines.records import StageRecord, TuneRecord

TRIAL_STAGE = "tune_trial"
TRIAL_DRIVER_CPUS = 0.1
"""CPU a trial's trainable (the Train driver) reserves; its Train workers reserve their own."""
READER_CPUS_PER_TRIAL = 1.0
"""Free CPU each concurrent trial leaves for its Ray Data readers (see ``max_concurrent_trials``)."""
COMPLETED, STOPPED_EARLY, ERRORED = "completed", "stopped_early", "errored"


def trial_overlay(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """What a trial changes in the pipeline config before its sample: short pretraining (``tune.epochs``, within
    ``tune.trial_budget_minutes`` when set) with kNN every epoch, the tune section's workers, no retries, the search
    itself off."""
    t = cfg.tune
    return {
        "tune": {"enabled": False},
        "pretrain": {"epochs": t.epochs, "knn_every": 1, "checkpoint_every": t.epochs,
                     "budget_minutes": t.trial_budget_minutes},
        "scaling": {"num_workers": t.num_workers, "cpus_per_worker": t.cpus_per_worker,
                    "gpus_per_worker": t.gpus_per_worker, "use_gpu": t.gpus_per_worker > 0, "max_failures": 0},
    }


def finetune_trial_overlay(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """What a fine-tune trial changes before its sample: ``tune.epochs`` of fine-tuning, checkpointed once, on the
    tune section's workers, no retries, both searches off."""
    return {"tune": {"enabled": False, "finetune": False}, "finetune": {"epochs": cfg.tune.epochs},
            "scaling": trial_overlay(cfg)["scaling"]}


def trial_number(trial_id: str) -> int:
    """Tune's trial ids end in the trial's creation index: ``"3f2a1_00002"`` -> 2."""
    return int(trial_id.rsplit("_", 1)[-1])


def run_trial(sample: dict[str, Any], setup: dict[str, Any]) -> None:
    """The Tune trainable: one nested MLflow run and one pretraining (``fit_pretraining``) per trial, or one
    fine-tuning (``fit_finetune_trial``) when ``setup`` holds the pretrain ``checkpoint_uri``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.finetuning import fit_finetune_trial
    from pipelines.pretraining import fit_pretraining

    trial_id = ray.tune.get_context().get_trial_id()
    number = trial_number(trial_id)
    cfg = PipelineConfig.from_dict(setup["trial_config"]).with_overlay(sample)
    tags = {tracking.STAGE_TAG: TRIAL_STAGE, tracking.TRIAL_TAG: trial_id, tracking.PIPELINE_TAG: cfg.name}
    stage = "tune_finetune" if "checkpoint_uri" in setup else "tune"
    run_id = tracking.start_run(cfg.tracking, tracking.nested_run_name(cfg.name, stage, f"trial-{number:03d}"), tags,
                                parent_run_id=setup["tune_run_id"])
    tracking.log_params(cfg.tracking, run_id, sample)
    faults.fail_trial(faults.active(), number)  # a test's SSLFLOW_FAULTS (pipelines.faults)
    train_run = f"tune-{setup['tune_run_id']}-{trial_id}"
    if stage == "tune_finetune":
        fit_finetune_trial(cfg, run_id, train_run, setup["checkpoint_uri"], callbacks=[TuneReportCallback()])
    else:
        fit_pretraining(cfg, run_id, train_run, callbacks=[TuneReportCallback()], log_model=False)


def max_concurrent_trials(cfg: PipelineConfig) -> int:
    """``tune.max_concurrent_trials``, or (0) as many trials as the cluster's CPUs and GPUs hold at once.

    A trial holds its driver's CPU, its workers' CPUs, and one whole free CPU for its Ray Data readers: Ray 2.60's
    data autoscaling coordinator splits the CPUs left over by Train among concurrent datasets in whole CPUs
    (``leftover // datasets``), so a dataset whose share rounds down to 0 never reads and its trial hangs.
    """
    import ray

    t = cfg.tune
    if t.max_concurrent_trials > 0:
        return min(t.max_concurrent_trials, t.num_samples)
    resources = ray.cluster_resources()
    per_trial_cpus = TRIAL_DRIVER_CPUS + t.num_workers * t.cpus_per_worker + READER_CPUS_PER_TRIAL
    fits = math.floor(resources.get("CPU", 0.0) / per_trial_cpus + 1e-9)
    if t.gpus_per_worker > 0:
        fits = min(fits, math.floor(resources.get("GPU", 0.0) / (t.num_workers * t.gpus_per_worker) + 1e-9))
    return max(1, min(fits, t.num_samples))


def _searcher(cfg: PipelineConfig, metric: str, mode: str, concurrent: int):
    """Seeded random search or Optuna's TPE, at most ``concurrent`` trials at once (Tune ignores
    ``TuneConfig.max_concurrent_trials`` when given a search algorithm, so the limit goes here)."""
    if cfg.tune.searcher == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=cfg.tune.seed), concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=concurrent)


def _scheduler(cfg: PipelineConfig):
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=cfg.tune.epochs, grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor)


def error_reason(error: BaseException | None) -> str:
    """The last line of the innermost error message (the cause a person reads first)."""
    while error is not None and error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def trial_state(errored: bool, epochs_reported: int, epochs: int) -> str:
    """ERRORED for a trial that raised, STOPPED_EARLY for one that reported fewer than ``tune.epochs`` epochs (the
    scheduler stopped it), else COMPLETED."""
    return ERRORED if errored else STOPPED_EARLY if epochs_reported < epochs else COMPLETED


def trial_state_callback(cfg: PipelineConfig):
    """A Tune callback (run by the search's driver) that tags a trial's MLflow run with its ``trial_state`` as soon
    as the trial ends, so the console's trials table shows it during the search; ``close_trial_runs`` ends the runs
    after the search."""
    from ray.tune import Callback

    class TagTrialState(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
            self._tag(trial, errored=False)

        def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
            self._tag(trial, errored=True)

        @staticmethod
        def _tag(trial, errored: bool) -> None:
            epochs = int((trial.last_result or {}).get("training_iteration", 0))
            found = tracking.search_runs(cfg.tracking, f"tags.`{tracking.TRIAL_TAG}` = '{trial.trial_id}'",
                                         max_results=1)
            if found:
                tracking.set_tags(cfg.tracking, found[0].info.run_id,
                                  {tracking.TRIAL_STATE_TAG: trial_state(errored, epochs, cfg.tune.epochs)})

    return TagTrialState()


def trial_table(results, cfg: PipelineConfig, metric: str, mode: str, searched: list[str]) -> pd.DataFrame:
    """One row per trial, best first (errored and unscored last): number, id, state, last metric, epochs
    reported, the searched values, error, MLflow run id."""
    rows = []
    for result in results:
        trial_id = Path(result.path).name
        reported = result.metrics or {}
        epochs = int(reported.get("training_iteration", 0))
        state = trial_state(result.error is not None, epochs, cfg.tune.epochs)
        found = tracking.search_runs(cfg.tracking, f"tags.`{tracking.TRIAL_TAG}` = '{trial_id}'", max_results=1)
        sample = tracking.flatten(result.config)
        rows.append({"trial": trial_number(trial_id), "trial_id": trial_id, "state": state,
                     metric: reported.get(metric), "epochs": epochs, **{name: sample[name] for name in searched},
                     "error": error_reason(result.error) if result.error is not None else "",
                     "run_id": found[0].info.run_id if found else ""})
    table = pd.DataFrame(rows).sort_values("trial")
    return table.sort_values(metric, ascending=mode == "min", na_position="last", kind="stable")


def close_trial_runs(cfg: PipelineConfig, table: pd.DataFrame, metric: str) -> None:
    """Tag each trial run with its state (and error), log its final metric, and end it (FINISHED, KILLED for a
    trial the scheduler stopped, FAILED for an error)."""
    status = {COMPLETED: "FINISHED", STOPPED_EARLY: "KILLED", ERRORED: "FAILED"}
    for row in table.to_dict("records"):
        if not row["run_id"]:
            continue
        tags = {tracking.TRIAL_STATE_TAG: row["state"]}
        if row["error"]:
            tags[tracking.TRIAL_ERROR_TAG] = row["error"][:4000]
        tracking.set_tags(cfg.tracking, row["run_id"], tags)
        if not pd.isna(row[metric]):
            tracking.log_metrics(cfg.tracking, row["run_id"], [(row["epochs"], {metric: row[metric]})])
        tracking.end_run(cfg.tracking, row["run_id"], status[row["state"]])


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"method.config.temperature": 0.2}`` -> ``{"method": {"config": {"temperature": 0.2}}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _log_results(cfg: PipelineConfig, run_id: str, table: pd.DataFrame, searched: list[str], metric: str) -> str:
    """Log the results table (CSV) and the metric-vs-parameter plot as artifacts; return the CSV's URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as directory:
        csv_path = Path(directory) / "tune_results.csv"
        table.to_csv(csv_path, index=False)
        uri = tracking.log_artifact(cfg.tracking, run_id, csv_path, "tune")
        figure, axes = plt.subplots(1, len(searched), figsize=(4 * len(searched), 3.2), squeeze=False)
        scored = table.dropna(subset=[metric])
        for axis, name in zip(axes[0], searched):
            for state, marker in ((COMPLETED, "o"), (STOPPED_EARLY, "x")):
                points = scored[scored["state"] == state]
                if len(points):
                    axis.scatter(points[name], points[metric], marker=marker, label=state.replace("_", " "))
            numeric = pd.to_numeric(table[name], errors="coerce").dropna()
            if len(numeric) and numeric.min() > 0 and numeric.max() / numeric.min() > 20:
                axis.set_xscale("log")
            axis.set_xlabel(name)
            axis.set_ylabel(metric)
            axis.legend(fontsize=7)
        figure.tight_layout()
        plot = Path(directory) / f"tune_{metric}_vs_params.png"
        figure.savefig(plot, dpi=100)
        plt.close(figure)
        tracking.log_artifact(cfg.tracking, run_id, plot, "tune")
    return uri


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> TuneRecord:
    """Run the search, record every trial, log the best overlay; raise if every trial failed. With a pretrain
    record in ``inputs`` (stage ``tune_finetune``) the trials fine-tune its checkpoint (module docstring)."""
    import ray.tune

    pretrain = inputs.get("pretrain")
    if pretrain is None:
        train_rows = read_manifest(cfg.data.path)["splits"]["train"]["rows"]
        param_space, metric, mode = search_space(cfg, train_rows)
        setup = {"trial_config": cfg.with_overlay(trial_overlay(cfg)).to_dict(), "tune_run_id": run_id}
    else:
        param_space, metric, mode = finetune_search_space(cfg)
        setup = {"trial_config": cfg.with_overlay(finetune_trial_overlay(cfg)).to_dict(), "tune_run_id": run_id,
                 "checkpoint_uri": pretrain.checkpoint_uri}
    searched = sorted(tracking.flatten(param_space))
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), {"cpu": TRIAL_DRIVER_CPUS})
    tuner = ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=metric, mode=mode, num_samples=cfg.tune.num_samples,
            search_alg=_searcher(cfg, metric, mode, max_concurrent_trials(cfg)), scheduler=_scheduler(cfg),
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=ray.tune.RunConfig(name=f"tune-{run_id}", storage_path=cfg.scaling.storage_path, verbose=0,
                                      callbacks=[trial_state_callback(cfg)]),
    )
    started = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - started
    table = trial_table(results, cfg, metric, mode, searched)
    close_trial_runs(cfg, table, metric)
    counts = {state: int((table["state"] == state).sum()) for state in (COMPLETED, STOPPED_EARLY, ERRORED)}
    results_uri = _log_results(cfg, run_id, table, searched, metric)
    summary = {"search_seconds": seconds, **{f"trials_{k}": v for k, v in counts.items()}}
    if counts[ERRORED] == len(table) or table[metric].isna().all():
        tracking.log_metrics(cfg.tracking, run_id, [(0, summary)])
        reasons = "; ".join(f"trial {row['trial']}: {row['error'] or 'no metric reported'}"
                            for row in table.sort_values("trial").to_dict("records"))
        raise RuntimeError(f"tune: every one of the {len(table)} trials failed: {reasons}")
    best = results.get_best_result(metric, mode, scope="last")
    best_trial = Path(best.path).name
    best_sample = tracking.flatten(best.config)
    overlay = unflatten({name: best_sample[name] for name in searched})
    tracking.log_metrics(cfg.tracking, run_id, [(0, {**summary, f"best_{metric}": best.metrics[metric]})])
    tracking.log_params(cfg.tracking, run_id, {f"best.{name}": best_sample[name] for name in searched})
    tracking.set_tags(cfg.tracking, run_id, {tracking.BEST_TRIAL_TAG: best_trial})
    tracking.log_json(cfg.tracking, run_id, overlay, "best_config.json")
    return TuneRecord(config_overlay=overlay, metric=metric, mode=mode, best_value=best.metrics[metric],
                      best_trial=best_trial, trials=counts, search_seconds=seconds, results_uri=results_uri)
