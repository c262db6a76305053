"""The stage graph, declared once, and the driver that runs it as Ray tasks with stage reuse.

    ingest -> (tune) -> pretrain -> evaluate -> finetune -> distill -> register -> promote

A stage is the function ``run(cfg, run_id, inputs) -> <its record>`` of ``pipelines.stages.<name>``, where
``inputs`` maps each upstream stage to its record (``pipelines.records``). ``tune`` runs only when
``tune.enabled``; its record's ``config_overlay`` (the best hyperparameters found) is applied to the config of
the stages that consume it (``pretrain``).

Each stage is one ``@ray.remote`` call that receives its upstream stages' records (ObjectRefs, resolved by Ray),
so independent stages run in parallel (``finetune`` waits for ``evaluate``: its label-efficiency plot shows the
linear probe and kNN as references). The config crosses into the task as
``to_dict()`` and is rebuilt there once.

Fingerprint of a stage = sha256(stage name, the config sections it reads, its upstream stages' fingerprints,
the dataset content hash). A FINISHED MLflow run of the same stage with the same fingerprint is reused (its
record is stored in the run's ``sslflow.record`` tag), so rerunning a crashed pipeline resumes at the first
unfinished stage. ``force`` reruns the named stages and everything downstream of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

from pipelines import tracking
from pipelines.config import PipelineConfig, config_value
from pipelines.datasets import has_manifest, read_manifest
from pipelines.records import (
    ClassifierRecord,
    EvaluateRecord,
    FinetuneRecord,
    IngestRecord,
    PretrainRecord,
    PromoteRecord,
    RegisterRecord,
    StageRecord,
    TuneRecord,
)


@dataclass(frozen=True)
class Stage:
    """A node: its upstream stages, the config keys its fingerprint covers, its record type and Ray resources.
    ``enabled_by`` names a boolean config key that switches an optional stage (and the edges into it) on."""

    name: str
    upstream: tuple[str, ...]
    config_keys: tuple[str, ...]
    record: type[StageRecord]
    num_cpus: float = 0.0
    reusable: bool = True
    enabled_by: str | None = None
    output_version: int = 0
    """Raised when what the stage writes changes incompatibly (finetune and distill: 1, their models became
    ``ssl_core.classifier.Classifier``; finetune: 2, its record holds a teacher per labeled fraction; register: 1,
    it registers served python_function models, not the training runs' pickled modules); part of the fingerprint
    when not 0, so older runs are not reused."""

    def run(self, cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> StageRecord:
        """``pipelines.stages.<name>.run``, imported when the stage runs (planning, a dry run and ``sslflow ls``
        do not import Ray Train)."""
        return importlib.import_module(f"pipelines.stages.{self.name}").run(cfg, run_id, inputs)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("ingest", (), ("data",), IngestRecord, num_cpus=0.5),
        Stage("tune", ("ingest",), ("tune", "method", "pretrain", "scaling.use_gpu"), TuneRecord,
              enabled_by="tune.enabled"),
        Stage("pretrain", ("ingest", "tune"), ("method", "pretrain", "scaling.num_workers", "scaling.use_gpu"),
              PretrainRecord),
        Stage("evaluate", ("ingest", "pretrain"), ("evaluate",), EvaluateRecord, num_cpus=0.5),
        Stage("finetune", ("ingest", "pretrain", "evaluate"), ("finetune", "scaling.num_workers", "scaling.use_gpu"),
              FinetuneRecord, output_version=2),
        Stage("distill", ("ingest", "finetune"), ("distill", "scaling.num_workers", "scaling.use_gpu"),
              ClassifierRecord, output_version=1),
        Stage("register", ("ingest", "pretrain", "finetune", "distill"), ("registry",), RegisterRecord,
              output_version=1),
        Stage("promote", ("register",), ("registry",), PromoteRecord, reusable=False),
    )
}
"""The whole graph, in topological order; ``stages_for`` gives the part a config runs."""


def stages_for(cfg: PipelineConfig, until: str | None = None) -> dict[str, Stage]:
    """The graph ``cfg`` runs: optional stages whose switch is off are dropped with the edges into them; with
    ``until``, only that stage and what it depends on."""
    config = cfg.to_dict()
    off = {stage.name for stage in STAGES.values() if stage.enabled_by and not config_value(config, stage.enabled_by)}
    graph = {
        stage.name: dataclasses.replace(stage, upstream=tuple(up for up in stage.upstream if up not in off))
        for stage in STAGES.values() if stage.name not in off
    }
    if until is None:
        return graph
    if until not in graph:
        reason = " (it is switched off in this config)" if until in STAGES else ""
        raise ValueError(f"unknown stage {until!r}{reason}; stages: {', '.join(graph)}")
    needed = {until}
    for stage in reversed(list(graph.values())):
        if stage.name in needed:
            needed.update(stage.upstream)
    return {name: stage for name, stage in graph.items() if name in needed}


def downstream_of(names: Iterable[str], graph: dict[str, Stage] = STAGES) -> set[str]:
    """``names`` and every stage that depends on them, transitively."""
    selected = set(names)
    for stage in graph.values():
        if any(up in selected for up in stage.upstream):
            selected.add(stage.name)
    return selected


def fingerprint(stage: Stage, config: dict[str, Any], upstream: dict[str, str], dataset_hash: str | None) -> str:
    payload = {
        "stage": stage.name,
        "config": {key: config_value(config, key) for key in stage.config_keys},
        "upstream": upstream,
        "dataset": dataset_hash if stage.name != "ingest" else None,
    }
    if stage.output_version:
        payload["output_version"] = stage.output_version
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class StagePlan:
    name: str
    fingerprint: str | None
    reused: StageRecord | None
    reason: str


@dataclass
class PipelineResult:
    run_id: str | None
    records: dict[str, StageRecord] = field(default_factory=dict)
    plan: list[StagePlan] = field(default_factory=list)


def _known_dataset_hash(cfg: PipelineConfig) -> str | None:
    if not has_manifest(cfg.data.path):
        return None
    return read_manifest(cfg.data.path)["content_hash"]


def plan(cfg: PipelineConfig, dataset_hash: str | None, force: Iterable[str] = (),
         ingest_record: IngestRecord | None = None, until: str | None = None) -> list[StagePlan]:
    """For each stage in order: its fingerprint, the FINISHED run's record it would reuse (or None), and why."""
    graph = stages_for(cfg, until)
    unknown = set(force) - set(graph)
    if unknown:
        raise ValueError(f"unknown stage {sorted(unknown)[0]!r} in --force; stages: {', '.join(graph)}")
    forced = downstream_of(force, graph)
    config = cfg.to_dict()
    fingerprints: dict[str, str | None] = {}
    plans: list[StagePlan] = []
    for stage in graph.values():
        upstream = {up: fingerprints[up] for up in stage.upstream}
        if stage.name != "ingest" and (dataset_hash is None or None in upstream.values()):
            fingerprints[stage.name] = None
            plans.append(StagePlan(stage.name, None, None, "run: its inputs are produced in this run"))
            continue
        fp = fingerprint(stage, config, upstream, dataset_hash)
        fingerprints[stage.name] = fp
        if stage.name in forced:
            plans.append(StagePlan(stage.name, fp, None, "run: forced"))
        elif not stage.reusable:
            plans.append(StagePlan(stage.name, fp, None, "run: always runs (depends on the registry's state)"))
        elif stage.name == "ingest" and ingest_record is not None:
            plans.append(StagePlan(stage.name, fp, ingest_record, f"reuse run {ingest_record.run_id}"))
        else:
            found = tracking.find_finished_stage(cfg.tracking, stage.name, fp)
            record = None if found is None else stage.record.from_dict(found)
            if isinstance(record, IngestRecord) and record.content_hash != _known_dataset_hash(cfg):
                plans.append(StagePlan(stage.name, fp, None, f"run: the dataset at {cfg.data.path} is missing or changed"))
            elif record is None:
                plans.append(StagePlan(stage.name, fp, None, "run: no FINISHED run with this fingerprint"))
            else:
                plans.append(StagePlan(stage.name, fp, record, f"reuse run {record.run_id}"))
    return plans


def execute_stage(stage_name: str, config: dict[str, Any], fingerprint_value: str, pipeline_run_id: str,
                  *upstream_records: StageRecord) -> StageRecord:
    """Run one stage in its own MLflow run nested under the pipeline's; returns its record with ``run_id`` and
    ``fingerprint``. An upstream ``TuneRecord``'s overlay is applied to this stage's config."""
    cfg = PipelineConfig.from_dict(config)
    stage = stages_for(cfg)[stage_name]
    inputs = dict(zip(stage.upstream, upstream_records))
    for record in inputs.values():
        if isinstance(record, TuneRecord):
            cfg = cfg.with_overlay(record.config_overlay)
    tags = {
        tracking.STAGE_TAG: stage_name,
        tracking.FINGERPRINT_TAG: fingerprint_value,
        tracking.UPSTREAM_TAG: json.dumps({name: record.run_id for name, record in inputs.items()}),
        tracking.PIPELINE_TAG: cfg.name,
    }
    values = cfg.to_dict()
    params = {key: config_value(values, key) for key in stage.config_keys}
    tracking.fail_dead_attempts(cfg.tracking, stage_name, pipeline_run_id)
    with tracking.run(cfg.tracking, tracking.stage_run_name(cfg.name, stage_name), tags, pipeline_run_id,
                      params) as run_id:
        record = dataclasses.replace(stage.run(cfg, run_id, inputs), run_id=run_id, fingerprint=fingerprint_value)
        tracking.set_tags(cfg.tracking, run_id, {tracking.RECORD_TAG: record.to_json()})
    return record


def run_pipeline(cfg: PipelineConfig, *, force: Iterable[str] = (), dry_run: bool = False, until: str | None = None,
                 echo: Callable[[str], None] = print,
                 monitor: Callable[[str], AbstractContextManager] | None = None) -> PipelineResult:
    """Run (or with ``dry_run`` only plan) the pipeline, or with ``until`` only that stage and its upstream;
    Ray must be initialised unless ``dry_run``. ``echo`` gets the run's and each stage's reuse decision;
    ``monitor(pipeline_run_id)`` (e.g. ``pipelines.console.ProgressMonitor``) is entered while the stages run."""
    force = list(force)
    tracking.ensure_experiment(cfg.tracking)
    if dry_run:
        plans = plan(cfg, _known_dataset_hash(cfg), force, until=until)
        return PipelineResult(None, {}, plans)

    import ray

    remote_stage = ray.remote(execute_stage)
    config = cfg.to_dict()
    parent = tracking.start_run(cfg.tracking, tracking.stage_run_name(cfg.name, "pipeline"),
                                tags={tracking.PIPELINE_TAG: cfg.name, tracking.STAGE_TAG: "pipeline"})
    tracking.log_params(cfg.tracking, parent, config)
    echo(f"pipeline {cfg.name}: MLflow run {parent} ({cfg.tracking.uri})")
    watching = ExitStack()
    try:
        if monitor is not None:
            watching.enter_context(monitor(parent))
        # Ingest first: every other fingerprint includes the content hash of the dataset it produces.
        ingest_plan = plan(cfg, None, force, until=until)[0]
        if ingest_plan.reused is not None:
            ingest_record = ingest_plan.reused
        else:
            ingest_record = ray.get(
                remote_stage.options(num_cpus=STAGES["ingest"].num_cpus, name="sslflow-ingest").remote(
                    "ingest", config, ingest_plan.fingerprint, parent
                )
            )
        plans = [ingest_plan, *plan(cfg, ingest_record.content_hash, force, ingest_record, until)[1:]]
        graph = stages_for(cfg, until)
        refs: dict[str, Any] = {"ingest": ingest_record}
        for stage_plan in plans:
            stage = graph[stage_plan.name]
            if stage_plan.reused is not None:
                refs[stage.name] = stage_plan.reused
                tracking.set_tags(cfg.tracking, parent, {tracking.reused_tag(stage.name): stage_plan.reused.run_id})
            elif stage.name != "ingest":
                refs[stage.name] = remote_stage.options(num_cpus=stage.num_cpus, name=f"sslflow-{stage.name}").remote(
                    stage.name, config, stage_plan.fingerprint, parent, *(refs[up] for up in stage.upstream)
                )
            echo(f"  {stage.name:<9} {stage_plan.reason}")
        names = list(refs)
        values = ray.get([refs[name] if isinstance(refs[name], ray.ObjectRef) else ray.put(refs[name])
                          for name in names])
        records = dict(zip(names, values))
    except BaseException as error:
        watching.close()
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        tracking.end_run(cfg.tracking, parent, status)
        raise
    watching.close()
    if "evaluate" in records and "distill" in records:
        tracking.log_metrics(cfg.tracking, parent, [(0, summary_metrics(records))])
    tracking.end_run(cfg.tracking, parent, "FINISHED")
    return PipelineResult(parent, records, plans)


def summary_metrics(records: dict[str, StageRecord]) -> dict[str, float]:
    """The headline numbers of a finished pipeline, flat, for the parent run and the terminal table."""
    evaluate = records["evaluate"].metrics
    return {
        "knn_top1_random": evaluate["knn_top1_random"],
        "knn_top1_ssl": evaluate["knn_top1_ssl"],
        "linear_top1_random": evaluate["linear_top1_random"],
        "linear_top1_ssl": evaluate["linear_top1_ssl"],
        "teacher_test_top1": records["finetune"].metrics["test_top1"],
        "student_test_top1": records["distill"].metrics["test_top1"],
    }
