"""Tune stage: a Ray Tune search over a method's hyperparameters, short pretraining runs scored by kNN top-1.

Each trial is a Tune function trainable that acts as a Ray Train driver (the Train V2 pattern): it opens an
MLflow run nested under the stage's run, builds a ``TorchTrainer`` around the pretrain stage's ``train_func``
with ``TuneReportCallback``, so rank 0's per-epoch metrics (``knn_top1``) reach Tune and ASHA. Trials pack onto
the cluster: each asks for ``tune.num_workers`` Train workers of ``tune.cpus_per_worker`` (+ GPUs), its trainable 0.1 CPU, and
``max_concurrent_trials`` bounds how many run at once (0: as many as the cluster holds, counting one free CPU
per trial for its Ray Data readers).

After the search the driver classifies every trial (completed / stopped early / errored, with the reason),
closes its MLflow run, and logs on the stage's run: the best overlay, a results table (CSV), and a plot of the
metric against each searched parameter. Best = argmax (or argmin) of each trial's last reported metric, the
value logged as the trial run's ``<metric>``. The stage's record carries ``config_overlay``, which the DAG merges
into the pretrain stage's config.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.config import PipelineConfig, PretrainSection, config_from_mapping, deep_merge
from pipelines.stages.ingest import read_manifest

TRIAL_STAGE = "tune_trial"
TRIAL_TAG = "sslflow.trial_id"
TRIAL_STATE_TAG = "sslflow.trial_state"
TRIAL_ERROR_TAG = "sslflow.trial_error"
TRIAL_DRIVER_CPUS = 0.1
"""CPU a trial's trainable (the Train driver) reserves; its Train workers reserve their own."""
READER_CPUS_PER_TRIAL = 1.0
"""Free CPU each concurrent trial leaves for its Ray Data readers (see ``max_concurrent_trials``)."""
COMPLETED, STOPPED_EARLY, ERRORED = "completed", "stopped_early", "errored"


def search_space(cfg: PipelineConfig, train_rows: int) -> tuple[dict[str, Any], str, str]:
    """``(param_space, metric, mode)``: the nested overlay ``{"method": {"config": ...}, "pretrain": ...}`` of
    Ray Tune domains, validated against the method's and the pretrain section's ranges."""
    from tune_spaces import method_search_space, shared_search_space, validate_fields

    t = cfg.tune
    method_dims, metric, mode = method_search_space(cfg.method.name, train_rows, t.space, t.bounds)
    shared_dims = shared_search_space(cfg.pretrain.lr, cfg.pretrain.weight_decay, t.search_lr,
                                      t.search_weight_decay, t.bounds)
    validate_fields(PretrainSection, shared_dims, "tune space", "pretrain.")
    if not method_dims and not shared_dims:
        raise ValueError(f"tune: the space for method {cfg.method.name!r} searches nothing; "
                         "set tune.search_lr / tune.search_weight_decay or add tune.bounds")
    param_space: dict[str, Any] = {}
    if method_dims:
        param_space["method"] = {"config": method_dims}
    if shared_dims:
        param_space["pretrain"] = shared_dims
    return param_space, metric, mode


def check_tune_section(cfg: PipelineConfig) -> None:
    """Up-front validation of an enabled search (called at config load): space, ranges, scheduler, searcher."""
    t = cfg.tune
    search_space(cfg, train_rows=1 << 20)
    if t.scheduler == "asha" and t.grace_period > t.epochs:
        raise ValueError(f"tune.grace_period={t.grace_period} exceeds tune.epochs={t.epochs}")
    if t.searcher == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ValueError("tune.searcher=optuna needs optuna: pip install -e '.[optuna]'")


def trial_base_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The pipeline config a trial starts from: short pretraining with kNN every epoch, the tune section's
    workers, no retries, the search itself off."""
    t = cfg.tune
    values = cfg.to_dict()
    values["tune"] = {**values["tune"], "enabled": False}
    values["pretrain"].update(epochs=t.epochs, knn_every=1, checkpoint_every=t.epochs)
    values["scaling"].update(num_workers=t.num_workers, cpus_per_worker=t.cpus_per_worker,
                             gpus_per_worker=t.gpus_per_worker, use_gpu=t.gpus_per_worker > 0,
                             max_failures=0)
    return values


def trial_number(trial_id: str) -> int:
    """Tune's trial ids end in the trial's creation index: ``"3f2a1_00002"`` -> 2."""
    return int(trial_id.rsplit("_", 1)[-1])


def run_trial(overlay: dict[str, Any], setup: dict[str, Any]) -> None:
    """The Tune trainable: one nested MLflow run and one ``TorchTrainer`` (pretrain's ``train_func``) per trial."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.datasets import read_split
    from pipelines.ray_train import fit
    from pipelines.stages.pretrain import pretrain_job, train_func

    trial_id = ray.tune.get_context().get_trial_id()
    number = trial_number(trial_id)
    cfg = config_from_mapping(deep_merge(setup["base_config"], overlay))
    tags = {tracking.STAGE_TAG: TRIAL_STAGE, TRIAL_TAG: trial_id, tracking.PIPELINE_TAG: cfg.name}
    run_id = tracking.start_run(cfg.tracking, f"trial-{number:03d}", tags, parent_run_id=setup["tune_run_id"])
    tracking.log_params(cfg.tracking, run_id, overlay)
    if number == setup["inject_failure_trial"]:
        raise RuntimeError(f"injected failure in trial {number} (tune.inject_failure_trial)")
    run_name = f"tune-{setup['tune_run_id']}-{trial_id}"
    job = pretrain_job(cfg, run_id, run_name, log_model=False)
    dataset = read_split(cfg.data.path, "train", image_size=cfg.data.image_size)
    fit(train_func, dataclasses.asdict(job), cfg.scaling, run_name, {"train": dataset},
        callbacks=[TuneReportCallback()])


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


def trial_rows(results, cfg: PipelineConfig, metric: str) -> list[dict[str, Any]]:
    """One row per trial: number, id, state, last metric, epochs reported, the searched values, error, run id."""
    rows = []
    for result in results:
        trial_id = Path(result.path).name
        reported = result.metrics or {}
        epochs = int(reported.get("training_iteration", 0))
        if result.error is not None:
            state = ERRORED
        elif epochs < cfg.tune.epochs:
            state = STOPPED_EARLY
        else:
            state = COMPLETED
        found = tracking.search_runs(cfg.tracking, f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
        rows.append({
            "trial": trial_number(trial_id),
            "trial_id": trial_id,
            "state": state,
            metric: reported.get(metric),
            "epochs": epochs,
            **tracking.flatten(result.config),
            "error": error_reason(result.error) if result.error is not None else "",
            "run_id": found[0].info.run_id if found else "",
        })
    return sorted(rows, key=lambda row: row["trial"])


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The first of ``sort_rows`` that did not error (ties: the earliest trial), or None."""
    return next((row for row in sort_rows(rows, metric, mode) if row["state"] != ERRORED and row[metric] is not None),
                None)


def close_trial_runs(cfg: PipelineConfig, rows: list[dict[str, Any]], metric: str) -> None:
    """Tag each trial run with its state (and error), log its final metric, and end it (FINISHED, KILLED for a
    trial the scheduler stopped, FAILED for an error)."""
    status = {COMPLETED: "FINISHED", STOPPED_EARLY: "KILLED", ERRORED: "FAILED"}
    for row in rows:
        if not row["run_id"]:
            continue
        tags = {TRIAL_STATE_TAG: row["state"]}
        if row["error"]:
            tags[TRIAL_ERROR_TAG] = row["error"][:4000]
        tracking.set_tags(cfg.tracking, row["run_id"], tags)
        if row[metric] is not None:
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


def _log_results(cfg: PipelineConfig, run_id: str, rows: list[dict[str, Any]], searched: list[str], metric: str,
                 mode: str) -> str:
    """Write the results CSV (best first) and the metric-vs-parameter plot as artifacts; return the CSV's URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sort_rows(rows, metric, mode)
    columns = ["trial", "trial_id", "state", metric, "epochs", *searched, "error", "run_id"]
    with tempfile.TemporaryDirectory() as directory:
        table = Path(directory) / "tune_results.csv"
        with table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(ordered)
        uri = tracking.log_artifact(cfg.tracking, run_id, table, "tune")
        figure, axes = plt.subplots(1, len(searched), figsize=(4 * len(searched), 3.2), squeeze=False)
        for axis, name in zip(axes[0], searched):
            for state, marker in ((COMPLETED, "o"), (STOPPED_EARLY, "x")):
                points = [(row[name], row[metric]) for row in rows if row["state"] == state and row[metric] is not None]
                if points:
                    axis.scatter(*zip(*points), marker=marker, label=state.replace("_", " "))
            numeric = [row[name] for row in rows if isinstance(row.get(name), (int, float))]
            if numeric and min(numeric) > 0 and max(numeric) / min(numeric) > 20:
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


def sort_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Best first; trials without a metric (errored) last."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda row: (row[metric] is None, sign * (row[metric] or 0.0), row["trial"]))


def run_tune(cfg: PipelineConfig, run_id: str) -> dict[str, Any]:
    """Driver: run the search, record every trial, log the best overlay; raise if every trial failed."""
    import ray.tune

    train_rows = read_manifest(cfg.data.path)["splits"]["train"]["rows"]
    param_space, metric, mode = search_space(cfg, train_rows)
    searched = sorted(tracking.flatten(param_space))
    setup = {"base_config": trial_base_config(cfg), "tune_run_id": run_id,
             "inject_failure_trial": cfg.tune.inject_failure_trial}
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), {"cpu": TRIAL_DRIVER_CPUS})
    tuner = ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=metric, mode=mode, num_samples=cfg.tune.num_samples,
            search_alg=_searcher(cfg, metric, mode, max_concurrent_trials(cfg)), scheduler=_scheduler(cfg),
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=ray.tune.RunConfig(name=f"tune-{run_id}", storage_path=cfg.scaling.storage_path, verbose=0),
    )
    started = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - started
    rows = trial_rows(results, cfg, metric)
    close_trial_runs(cfg, rows, metric)
    counts = {state: sum(row["state"] == state for row in rows) for state in (COMPLETED, STOPPED_EARLY, ERRORED)}
    results_uri = _log_results(cfg, run_id, rows, searched, metric, mode)
    best = best_row(rows, metric, mode)
    summary = {"search_seconds": seconds, **{f"trials_{k}": v for k, v in counts.items()}}
    tracking.log_metrics(cfg.tracking, run_id, [(0, summary if best is None else {**summary,
                                                                                   f"best_{metric}": best[metric]})])
    if best is None:
        reasons = "; ".join(f"trial {row['trial']}: {row['error'] or 'no metric reported'}" for row in rows)
        raise RuntimeError(f"tune: every one of the {len(rows)} trials failed: {reasons}")
    overlay = unflatten({name: best[name] for name in searched})
    tracking.log_params(cfg.tracking, run_id, {f"best.{name}": best[name] for name in searched})
    tracking.set_tags(cfg.tracking, run_id, {"sslflow.best_trial": best["trial_id"]})
    tracking.log_json(cfg.tracking, run_id, overlay, "best_config.json")
    return {
        "config_overlay": overlay,
        "metric": metric,
        "mode": mode,
        "best_value": best[metric],
        "best_trial": best["trial_id"],
        "trials": counts,
        "search_seconds": seconds,
        "results_uri": results_uri,
    }
