"""Terminal output: the end-of-pipeline summary table, the Tune trials table, ``sslflow ls`` and ``sslflow show``."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

from pipelines import tracking
from pipelines.config import PipelineConfig
from pipelines.dag import STAGES, PipelineResult, summary_metrics
from pipelines.records import TuneRecord, fraction_key


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def _teacher_rows(cfg: PipelineConfig, finetune_metrics: dict[str, float]) -> list[tuple[str, str]]:
    """One row per ``finetune.fractions``: the fine-tuned teacher's test top-1, the distilled one marked."""
    rows = []
    for fraction in cfg.finetune.fractions:
        distilled = ", distilled" if fraction == cfg.teacher_fraction else ""
        rows.append((f"fine-tuned teacher ({fraction * 100:g}% labels{distilled})",
                     f"{finetune_metrics[f'test_top1_fraction_{fraction_key(fraction)}']:.4f}"))
    return rows


def summary_table(cfg: PipelineConfig, result: PipelineResult, seconds: float) -> str:
    records = result.records
    metrics = summary_metrics(records)
    promote = records["promote"]
    register = records["register"]
    reused = [p.name for p in result.plan if p.reused is not None]
    rows = [
        ("kNN top-1, random init / SSL", f"{metrics['knn_top1_random']:.4f} / {metrics['knn_top1_ssl']:.4f}"),
        ("linear probe top-1, random / SSL", f"{metrics['linear_top1_random']:.4f} / {metrics['linear_top1_ssl']:.4f}"),
        *_teacher_rows(cfg, records["finetune"].metrics),
        (f"distilled student ({cfg.distill.student_backbone}), test / val (gate)",
         f"{metrics['student_test_top1']:.4f} / {records['distill'].metrics.get('val_top1', float('nan')):.4f}"),
        ("registered version", f"{register.model_name}/{register.version} (alias challenger)"),
        ("champion", f"{'yes, promoted' if promote.promoted else 'no'}: {promote.reason}"),
        ("stages reused", ", ".join(reused) or "none"),
        ("pipeline run", f"{result.run_id}  ({seconds:.0f} s)"),
    ]
    return (
        f"\nsslflow pipeline {cfg.name!r}: test-split accuracy\n{_table(rows)}\n\n"
        f"open the MLflow UI with: mlflow ui --backend-store-uri {cfg.tracking.uri}\n"
    )


def list_pipelines(cfg: PipelineConfig, limit: int = 10) -> str:
    parents = tracking.search_runs(cfg.tracking, f"tags.`{tracking.STAGE_TAG}` = 'pipeline'", max_results=limit)
    if not parents:
        return f"no pipeline runs in {cfg.tracking.uri} (experiment {cfg.tracking.experiment})"
    lines = []
    for parent in parents:
        info, tags = parent.info, parent.data.tags
        lines.append(f"{info.run_id}  {tags.get(tracking.PIPELINE_TAG, '?'):<12} {info.status:<9} "
                     + "  ".join(f"{k}={v:.4f}" for k, v in sorted(parent.data.metrics.items())))
        children = {run.data.tags[tracking.STAGE_TAG]: run for run in tracking.search_runs(
            cfg.tracking, f"tags.`{tracking.PARENT_TAG}` = '{info.run_id}'")}
        for stage in STAGES:
            reused = tags.get(tracking.reused_tag(stage))
            if stage not in children and reused is None and STAGES[stage].enabled_by:
                continue  # an optional stage this pipeline did not switch on
            if stage in children:
                run = children[stage]
                record = json.loads(run.data.tags.get(tracking.RECORD_TAG, "{}"))
                key_metrics = {k: v for k, v in record.get("metrics", {}).items() if isinstance(v, float)}
                shown = "  ".join(f"{k}={v:.4f}" for k, v in list(key_metrics.items())[:4])
                lines.append(f"    {stage:<9} {run.info.status:<9} {run.info.run_id}  {shown}")
            elif reused is not None:
                lines.append(f"    {stage:<9} {'REUSED':<9} {reused}")
            else:
                lines.append(f"    {stage:<9} {'-':<9}")
    return "\n".join(lines)


def trials_table(cfg: PipelineConfig, tune_record: TuneRecord) -> str:
    """The tune stage's trials, best first (its ``tune_results.csv`` artifact), and the chosen overlay."""
    with tempfile.TemporaryDirectory() as directory:
        path = tracking.download_artifact(cfg.tracking, tune_record.results_uri, directory)
        with Path(path).open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    metric = tune_record.metric
    columns = [name for name in rows[0] if name not in ("trial_id", "run_id", "error")] + ["error"] if rows else []

    def cell(name: str, value: str) -> str:
        try:
            return f"{float(value):.4g}" if name not in ("trial", "epochs") else value
        except ValueError:
            return value[:60]

    table = [[name.removeprefix("method.config.") for name in columns]]
    table += [[cell(name, row[name]) for name in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip() for line in table]
    counts = ", ".join(f"{n} {state.replace('_', ' ')}" for state, n in tune_record.trials.items())
    return (
        f"\nsslflow tune {cfg.name!r}: {len(rows)} trials ({counts}) in {tune_record.search_seconds:.0f} s, "
        f"{metric} ({tune_record.mode}), best first\n" + "\n".join(f"  {line}" for line in lines)
        + f"\n\nbest: trial {tune_record.best_trial}  {metric}={tune_record.best_value:.4f}  "
        f"overlay {json.dumps(tune_record.config_overlay)}\n"
    )


def _metric(value: float) -> str:
    """A count as an integer (``1293``), anything else with 4 decimals (accuracies, losses: ``1.0000``)."""
    return str(int(value)) if float(value).is_integer() and abs(value) >= 2 else f"{value:.4f}"


def show_run(cfg: PipelineConfig, run_id: str | None = None) -> str:
    """``sslflow show``: one pipeline run's stages (status, time, its metrics), each stage run's artifacts, and the
    registry versions it produced (with their aliases). ``run_id`` defaults to the newest pipeline run."""
    from pipelines.console import format_duration
    from pipelines.report import latest_pipeline_run_id, pipeline_view

    view = pipeline_view(cfg.tracking, run_id or latest_pipeline_run_id(cfg.tracking))
    info = view.run.info
    lines = [f"pipeline {view.name}  run {view.run_id}  {info.status}"
             + ("" if info.end_time is None else f"  {format_duration((info.end_time - info.start_time) / 1000)}")]
    if view.run.data.metrics:
        lines.append("  " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(view.run.data.metrics.items())))
    lines.append("\nstages")
    for stage in view.stages.values():
        seconds = "-" if stage.seconds is None else format_duration(stage.seconds)
        lines.append(f"  {stage.name:<9} {stage.status:<9} {seconds:>12}  {stage.run.info.run_id}")
        numbers = {k: v for k, v in stage.record.get("metrics", {}).items() if isinstance(v, (int, float))}
        for start in range(0, len(numbers), 4):
            chunk = list(numbers.items())[start:start + 4]
            lines.append("              " + "  ".join(f"{k}={_metric(v)}" for k, v in chunk))
    lines.append("\nartifacts")
    for stage in view.stages.values():
        files = tracking.list_artifacts(cfg.tracking, stage.run.info.run_id)
        models = sorted({path.split("/")[0] for path, _ in files if "/" in path and path.split("/")[0] in
                         ("student", "teacher", "encoder", "model")})
        shown = [f"{path} ({size / 1024:.0f} KiB)" for path, size in files if path.split("/")[0] not in models]
        if shown or models:
            lines.append(f"  {stage.name}: " + ", ".join(shown + [f"{m}/ (MLflow model)" for m in models]))
    report_files = [path for path, _ in tracking.list_artifacts(cfg.tracking, view.run_id)]
    if report_files:
        lines.append(f"  pipeline: {', '.join(report_files)}")
    lines.append("\nregistry versions")
    register = view.stages.get("register")
    versions = [] if register is None else tracking.model_versions_of_runs(cfg.tracking, [register.run.info.run_id])
    for version in sorted(versions, key=lambda v: (v.name, int(v.version))):
        current = tracking.model_version(cfg.tracking, version.name, version.version)
        aliases = ", ".join(getattr(current, "aliases", []) or []) or "no alias"
        top1 = current.tags.get("test_top1")
        lines.append(f"  {version.name}/{version.version}  ({aliases})" + (f"  test_top1={top1}" if top1 else ""))
    if not versions:
        lines.append("  none")
    return "\n".join(lines)
