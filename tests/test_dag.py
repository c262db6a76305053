"""The pipeline DAG end to end on real Ray and real MLflow: all stages, reuse, config errors (kill-and-resume:
tests/test_resume.py; the promotion gate: tests/test_promotion.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.config import config_from_mapping
from pipelines.dag import STAGES, StagePlan, downstream_of, plan_lines, run_pipeline, stages_for
from conftest import shrunk_quickstart

pytestmark = pytest.mark.slow


def _stage_runs(uri: str, parent_run_id: str) -> dict[str, object]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sslflow")
    runs = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {run.data.tags[tracking.STAGE_TAG]: run for run in runs}


def test_quickstart_runs_every_stage_then_reuses_them(quickstart_run) -> None:
    cfg, first = quickstart_run.cfg, quickstart_run.result  # fine-tuned with FixMatch on two labeled fractions
    runs = _stage_runs(cfg.tracking.uri, first.run_id)
    assert set(runs) == set(stages_for(cfg)) == set(STAGES) - {"tune", "tune_finetune"}
    assert all(run.info.status == "FINISHED" for run in runs.values())
    assert MlflowClient(cfg.tracking.uri).get_run(first.run_id).info.status == "FINISHED"
    upstream = yaml.safe_load(runs["distill"].data.tags[tracking.UPSTREAM_TAG])
    assert upstream == {"ingest": runs["ingest"].info.run_id, "finetune": runs["finetune"].info.run_id}
    fraction_runs = _stage_runs(cfg.tracking.uri, runs["finetune"].info.run_id)  # nested under the stage's run
    assert set(fraction_runs) == {"finetune_fraction"}
    nested = MlflowClient(cfg.tracking.uri).search_runs(
        [runs["finetune"].info.experiment_id], f"tags.`mlflow.parentRunId` = '{runs['finetune'].info.run_id}'")
    assert sorted(float(r.data.params["label_fraction"]) for r in nested) == [0.05, 0.1]
    assert all(r.data.params["semi.algorithm"] == "fixmatch" and "mask_rate" in r.data.metrics for r in nested)
    finetune_metrics = runs["finetune"].data.metrics
    assert {"test_top1_fraction_0.05", "test_top1_fraction_0.1"} <= set(finetune_metrics)
    assert finetune_metrics["test_top1"] == finetune_metrics["test_top1_fraction_0.1"]
    plots = MlflowClient(cfg.tracking.uri).list_artifacts(runs["finetune"].info.run_id, "plots")
    assert [a.path for a in plots] == ["plots/label_efficiency.png"]

    name = cfg.registry.model_name
    challenger = tracking.version_for_alias(cfg.tracking, name, tracking.CHALLENGER)
    champion = tracking.version_for_alias(cfg.tracking, name, tracking.CHAMPION)
    assert challenger is not None and champion is not None and champion.version == challenger.version
    assert challenger.tags["pipeline_run_id"] == first.run_id
    assert challenger.tags["dataset_hash"].startswith("sha256:")
    assert 0.0 <= float(challenger.tags["test_top1"]) <= 1.0
    assert tracking.version_for_alias(cfg.tracking, f"{name}-teacher", tracking.CHALLENGER) is None
    metrics = first.records["evaluate"].metrics
    assert {"knn_top1_ssl", "knn_top1_random", "linear_top1_ssl", "linear_top1_random"} <= set(metrics)

    second = run_pipeline(cfg)
    reused = {p.name for p in second.plan if p.reused is not None}
    assert reused == set(stages_for(cfg)) - {"promote"}
    assert second.records["pretrain"].run_id == first.records["pretrain"].run_id
    assert second.records["promote"].reason == "already champion"
    assert set(_stage_runs(cfg.tracking.uri, second.run_id)) == {"promote"}

    forced = run_pipeline(cfg, dry_run=True, force=["distill"])
    assert {p.name for p in forced.plan if p.reused is None} == {"distill", "register", "promote"}


def test_a_retried_stage_task_fails_the_run_its_dead_attempt_left_running(tmp_path: Path) -> None:
    """Ray retries a stage task whose worker died (OOM, lost node); the retry marks the first attempt's run FAILED."""
    cfg = config_from_mapping({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db",
                                            "artifact_location": str(tmp_path / "artifacts")}}, base=tmp_path)
    parent = tracking.start_run(cfg.tracking, "pipeline", tags={tracking.STAGE_TAG: "pipeline"})
    other_parent = tracking.start_run(cfg.tracking, "pipeline", tags={tracking.STAGE_TAG: "pipeline"})

    def child(stage: str, parent_id: str, status: str | None = None) -> str:
        run_id = tracking.start_run(cfg.tracking, stage, tags={tracking.STAGE_TAG: stage}, parent_run_id=parent_id)
        if status is not None:
            tracking.end_run(cfg.tracking, run_id, status)
        return run_id

    dead = child("finetune", parent)
    finished, running_elsewhere = child("finetune", parent, "FINISHED"), child("finetune", other_parent)
    other_stage = child("distill", parent)
    assert tracking.fail_dead_attempts(cfg.tracking, "finetune", parent) == [dead]
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_run(dead).info.status == "FAILED"
    assert client.get_run(dead).data.tags[tracking.DEAD_ATTEMPT_TAG].startswith("its Ray task died")
    assert [client.get_run(r).info.status for r in (finished, running_elsewhere, other_stage)] == [
        "FINISHED", "RUNNING", "RUNNING"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pretrain": {"epochs": 0}}, r"pretrain\.epochs=0 is out of range \[1, 100000\]"),
        ({"method": {"name": "simclr", "config": {"temprature": 0.1}}}, r"unknown key method\.config\.temprature"),
        ({"finetun": {"epochs": 3}}, r"unknown key 'finetun'"),
    ],
)
def test_config_errors_name_the_key_and_start_nothing(tmp_path: Path, change: dict, message: str) -> None:
    values = shrunk_quickstart(tmp_path, tmp_path / "digits")
    for key, value in change.items():
        values[key] = {**values.get(key, {}), **value} if key in values else value
    config_path = tmp_path / "bad.yaml"
    config_path.write_text(yaml.safe_dump(values))
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(config_path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert __import__("re").search(message, result.stderr), result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
    assert "Ray" not in result.stderr + result.stdout


def test_force_selects_downstream_stages() -> None:
    assert downstream_of(["finetune"]) == {"finetune", "distill", "register", "promote"}
    assert downstream_of(["pretrain"]) == set(STAGES) - {"ingest", "tune"}


def test_plan_lines_put_consecutive_stages_of_one_reason_on_one_line() -> None:
    fresh, always = "run: no FINISHED run with this fingerprint", "run: always runs"
    plans = [StagePlan("ingest", "a", None, "reuse run 1"), StagePlan("pretrain", "b", None, fresh),
             StagePlan("evaluate", "c", None, fresh), StagePlan("promote", "d", None, always),
             StagePlan("register", "e", None, fresh)]
    assert plan_lines(plans) == ["  ingest    reuse run 1", f"  pretrain, evaluate {fresh}", f"  promote   {always}",
                                 f"  register  {fresh}"]
