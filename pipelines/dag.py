"""The stage graph, declared once, and the driver that runs it as Ray tasks with stage reuse.

    ingest -> (tune) -> pretrain -> evaluate -> finetune -> distill -> register -> promote
                        pretrain -> (tune_finetune) -> finetune

A stage is the function ``run(cfg, run_id, inputs) -> <its record>`` of ``pipelines.stages.<name>``, where
``inputs`` maps each upstream stage to its record (``pipelines.records``). ``tune`` runs only when
``tune.enabled``; its record's ``config_overlay`` (the best hyperparameters found) is applied to the config of
the stages that consume it (``pretrain``), and through the ``PretrainRecord`` to those downstream of pretrain,
which rebuild its method. ``tune_finetune`` (``tune.finetune``) searches ``finetune.semi`` with
fine-tune trials from the pretrain checkpoint, and its overlay is applied to ``finetune``.

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

from pipelines import faults, resume, tracking
from pipelines.config import PipelineConfig, config_value
from pipelines.datasets import read_manifest
from pipelines.reuse_check import record_digests, reuse_problem
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
    module: str | None = None
    """The module ``pipelines.stages.<module>`` that runs it (default: ``name``; ``tune_finetune`` is the tune
    stage's code, which searches fine-tuning when its inputs hold a pretrain record)."""
    output_version: int = 0
    """Raised when what the stage writes changes incompatibly (finetune and distill: 1, their models became
    ``ssl_core.classifier.Classifier``; finetune: 2, its record holds a teacher per labeled fraction; register: 1,
    it registers served python_function models, not the training runs' pickled modules; tune and pretrain: 1, they
    train on the train split only, no longer on val; distill and register: 2, the student's and teacher's val_top1,
    which promote gates on); part of the fingerprint when not 0, so older runs are not reused."""

    def run(self, cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord],
            force: bool = False) -> StageRecord:
        """``pipelines.stages.<name>.run``, imported when the stage runs (planning, a dry run and ``sslflow ls``
        do not import Ray Train). ``force`` (``--force <stage>``) reaches a stage that reuses its own output
        (ingest: an existing dataset), so that it rewrites it."""
        return importlib.import_module(f"pipelines.stages.{self.module or self.name}").run(
            cfg, run_id, inputs, **({"force": True} if force else {}))


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("ingest", (), ("data",), IngestRecord, num_cpus=0.5),
        Stage("tune", ("ingest",), ("tune", "method", "pretrain", "scaling.use_gpu"), TuneRecord,
              enabled_by="tune.enabled", output_version=1),
        Stage("pretrain", ("ingest", "tune"), ("method", "pretrain", "scaling.num_workers", "scaling.use_gpu"),
              PretrainRecord, output_version=1),
        Stage("evaluate", ("ingest", "pretrain"), ("evaluate",), EvaluateRecord, num_cpus=0.5),
        Stage("tune_finetune", ("ingest", "pretrain"), ("tune", "finetune", "scaling.use_gpu"), TuneRecord,
              enabled_by="tune.finetune", module="tune"),
        Stage("finetune", ("ingest", "pretrain", "evaluate", "tune_finetune"),
              ("finetune", "scaling.num_workers", "scaling.use_gpu"),
              FinetuneRecord, output_version=2),
        Stage("distill", ("ingest", "finetune"), ("distill", "scaling.num_workers", "scaling.use_gpu"),
              ClassifierRecord, output_version=2),
        Stage("register", ("ingest", "pretrain", "finetune", "distill"), ("registry",), RegisterRecord,
              output_version=2),
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
    """The content hash of the dataset at ``data.path`` when it is the ingest of ``data.source`` as the source is
    now; None when ingest must (re)write it (``pipelines.stages.ingest.dataset_mismatch``)."""
    if _dataset_mismatch(cfg) is not None:
        return None
    return read_manifest(cfg.data.path)["content_hash"]


def _dataset_mismatch(cfg: PipelineConfig) -> str | None:
    from pipelines.stages.ingest import dataset_mismatch  # imports torchvision: only when planning

    return dataset_mismatch(cfg.data)


def plan(cfg: PipelineConfig, dataset_hash: str | None, force: Iterable[str] = (),
         ingest_record: IngestRecord | None = None, until: str | None = None) -> list[StagePlan]:
    """For each stage in order: its fingerprint, the FINISHED run's record it would reuse (or None), and why.
    A finished run is reused only when the artifacts its record names are as they were when it finished
    (``pipelines.reuse_check``); a stage downstream of one that runs runs too."""
    graph = stages_for(cfg, until)
    unknown = set(force) - set(graph)
    if unknown:
        raise ValueError(f"unknown stage {sorted(unknown)[0]!r} in --force; stages: {', '.join(graph)}")
    forced = downstream_of(force, graph)
    config = cfg.to_dict()
    fingerprints: dict[str, str | None] = {}
    plans: list[StagePlan] = []
    rerunning: set[str] = set()  # stages that run (ingest aside: the dataset's content hash covers its output)
    for stage in graph.values():
        upstream = {up: fingerprints[up] for up in stage.upstream}
        if stage.name != "ingest" and (dataset_hash is None or None in upstream.values()):
            fingerprints[stage.name] = None
            plans.append(StagePlan(stage.name, None, None, "run: its inputs are produced in this run"))
            continue
        fp = fingerprint(stage, config, upstream, dataset_hash)
        fingerprints[stage.name] = fp
        rerun_upstream = [up for up in stage.upstream if up != "ingest" and up in rerunning]
        if stage.name in forced:
            plans.append(StagePlan(stage.name, fp, None, "run: forced"))
        elif not stage.reusable:
            plans.append(StagePlan(stage.name, fp, None, "run: always runs (depends on the registry's state)"))
        elif stage.name == "ingest" and ingest_record is not None:
            plans.append(StagePlan(stage.name, fp, ingest_record, f"reuse run {ingest_record.run_id}"))
        else:
            found = tracking.find_finished_stage(cfg.tracking, stage.name, fp)
            record = None if found is None else stage.record.from_dict(found)
            if isinstance(record, IngestRecord) and (mismatch := _dataset_mismatch(cfg)) is not None:
                plans.append(StagePlan(stage.name, fp, None, f"run: {mismatch}"))
            elif isinstance(record, IngestRecord) and (  # no mismatch: the manifest is there, the source unchanged
                    record.content_hash != read_manifest(cfg.data.path)["content_hash"]):
                plans.append(StagePlan(stage.name, fp, None, f"run: the dataset at {cfg.data.path} is missing or changed"))
            elif record is None:
                plans.append(StagePlan(stage.name, fp, None, "run: no FINISHED run with this fingerprint"))
            elif rerun_upstream:  # it consumes what this run makes again: never an older run's outputs
                plans.append(StagePlan(stage.name, fp, None, f"run: upstream {rerun_upstream[0]} runs again (run "
                                                             f"{record.run_id} used its earlier outputs)"))
            elif (problem := reuse_problem(cfg.tracking, record)) is not None:
                plans.append(StagePlan(stage.name, fp, None, f"run: {problem}"))
            else:
                plans.append(StagePlan(stage.name, fp, record, f"reuse run {record.run_id}"))
        if plans[-1].reused is None:
            rerunning.add(stage.name)
    return plans


def execute_stage(stage_name: str, config: dict[str, Any], fingerprint_value: str, pipeline_run_id: str,
                  *upstream_records: StageRecord, force: bool = False) -> StageRecord:
    """Run one stage in its own MLflow run nested under the pipeline's; returns its record with ``run_id`` and
    ``fingerprint``. The overlay of an upstream ``TuneRecord`` (the best trial's) or ``PretrainRecord`` (the one
    its pretraining ran with) is applied to this stage's config. ``force``: the stage
    was named by ``--force`` (``Stage.run``)."""
    cfg = PipelineConfig.from_dict(config)
    stage = stages_for(cfg)[stage_name]
    inputs = dict(zip(stage.upstream, upstream_records))
    for record in inputs.values():
        if isinstance(record, (TuneRecord, PretrainRecord)) and record.config_overlay:
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
        record = dataclasses.replace(stage.run(cfg, run_id, inputs, force), run_id=run_id,
                                     fingerprint=fingerprint_value)
        tracking.set_tags(cfg.tracking, run_id, {tracking.RECORD_TAG: record.to_json(), tracking.ARTIFACT_DIGESTS_TAG:
                                                 json.dumps(record_digests(cfg.tracking, record))})
    return record


def run_pipeline(cfg: PipelineConfig, *, force: Iterable[str] = (), dry_run: bool = False, until: str | None = None,
                 echo: Callable[[str], None] = print,
                 monitor: Callable[[str], AbstractContextManager] | None = None) -> PipelineResult:
    """Run (or with ``dry_run`` only plan) the pipeline, or with ``until`` only that stage and its upstream;
    Ray must be initialised unless ``dry_run``. ``echo`` gets the run's and each stage's reuse decision;
    ``monitor(pipeline_run_id)`` (e.g. ``pipelines.console.ProgressMonitor``) is entered while the stages run."""
    force = list(force)
    if dry_run:  # reads the store, writes nothing (no experiment, no sqlite file: tracking.store_exists)
        plans = plan(cfg, _known_dataset_hash(cfg), force, until=until)
        return PipelineResult(None, {}, plans)
    tracking.ensure_experiment(cfg.tracking)

    import ray

    fault_env = faults.runtime_env()  # a test's SSLFLOW_FAULTS reaches the stage tasks and what they start
    remote_stage = ray.remote(runtime_env=fault_env)(execute_stage) if fault_env else ray.remote(execute_stage)
    config = cfg.to_dict()
    resume.close_dead_runs(cfg.tracking, echo)  # runs a killed driver left RUNNING end KILLED
    parent = tracking.start_run(cfg.tracking, tracking.stage_run_name(cfg.name, "pipeline"),
                                tags={tracking.PIPELINE_TAG: cfg.name, tracking.STAGE_TAG: "pipeline",
                                      resume.DRIVER_TAG: resume.driver_identity()})
    tracking.log_params(cfg.tracking, parent, config)
    echo(f"pipeline {cfg.name}: MLflow run {parent} ({cfg.tracking.uri})")
    watching = ExitStack()
    launched: list[Any] = []  # the stage tasks' ObjectRefs, cancelled on Ctrl-C
    try:
        if monitor is not None:
            watching.enter_context(monitor(parent))
        # Ingest first: every other fingerprint includes the content hash of the dataset it produces.
        ingest_plan = plan(cfg, None, force, until=until)[0]
        if ingest_plan.reused is not None:
            ingest_record = ingest_plan.reused
        else:
            launched.append(remote_stage.options(num_cpus=STAGES["ingest"].num_cpus, name="sslflow-ingest").remote(
                "ingest", config, ingest_plan.fingerprint, parent, force="ingest" in force
            ))
            ingest_record = ray.get(launched[-1])
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
                launched.append(refs[stage.name])
        for line in plan_lines(plans):
            echo(line)
        names = list(refs)
        values = ray.get([refs[name] if isinstance(refs[name], ray.ObjectRef) else ray.put(refs[name])
                          for name in names])
        records = dict(zip(names, values))
    except BaseException as error:
        watching.close()
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        if isinstance(error, KeyboardInterrupt):
            _stop_stages(cfg, parent, launched)
        tracking.end_run(cfg.tracking, parent, status)
        raise
    watching.close()
    if "evaluate" in records and "distill" in records:
        tracking.log_metrics(cfg.tracking, parent, [(0, summary_metrics(records))])
    tracking.end_run(cfg.tracking, parent, "FINISHED")
    return PipelineResult(parent, records, plans)


def plan_lines(plans: list[StagePlan]) -> list[str]:
    """The reuse decisions as a person reads them: ``  <stage>   <reason>`` (the name padded to 9), with consecutive
    stages of one reason on one line (``  ingest, pretrain run: no FINISHED run with this fingerprint``)."""
    groups: list[tuple[list[str], str]] = []
    for stage_plan in plans:
        if groups and groups[-1][1] == stage_plan.reason:
            groups[-1][0].append(stage_plan.name)
        else:
            groups.append(([stage_plan.name], stage_plan.reason))
    return [f"  {', '.join(names):<9} {reason}" for names, reason in groups]


def _stop_stages(cfg: PipelineConfig, parent: str, launched: list[Any]) -> None:
    """Ctrl-C: kill the stage tasks (a stage's Ray Train run dies with the task that owns it), then end KILLED every
    run left RUNNING under the pipeline run ``parent``."""
    import ray

    for ref in launched:
        try:
            ray.cancel(ref, force=True)
        except (ValueError, TypeError, ray.exceptions.RayError):  # a task that already ended
            pass
    resume.end_running_under(cfg.tracking, parent, "KILLED", "the pipeline was interrupted (Ctrl-C)")


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
