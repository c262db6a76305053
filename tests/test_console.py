"""The console: progress lines and their numbers, the quiet terminal (Ray's and MLflow's output to a log file), the
progress monitor on a real MLflow store, and the terminal output of a real `sslflow run` that reuses every stage."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pipelines import tracking
from pipelines.config import config_from_mapping
from pipelines.console import (EPOCHS_DONE, EPOCHS_TOTAL, Console, Progress, ProgressMonitor, format_duration,
                               progress_from_metrics)

REPO = Path(__file__).resolve().parents[1]


def test_durations_read_as_a_person_says_them() -> None:
    assert format_duration(0.4) == "0 s"
    assert format_duration(42) == "42 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(3720) == "1 h 02 min"


def test_progress_line_has_epoch_loss_throughput_knn_and_eta_at_the_mean_pace() -> None:
    progress = Progress("pretrain", epochs_done=3, epochs_total=10, elapsed_seconds=30.0, loss=1.23456,
                        images_per_second=210.04, knn_top1=0.61234)
    assert progress.eta_seconds == 70.0  # 10 s per epoch done, 7 epochs left
    assert progress.line() == "  pretrain  epoch 3/10  loss 1.2346  images/s 210.0  kNN 0.6123  ETA 1 min 10 s"
    assert Progress("distill", 0, 4, 12.0).eta_seconds is None
    assert Progress("distill", 0, 4, 12.0).line() == "  distill   epoch 0/4"


def test_progress_is_read_from_the_metrics_the_training_loop_logs() -> None:
    metrics = {EPOCHS_TOTAL: 15.0, EPOCHS_DONE: 5.0, "epoch_loss": 2.0, "epoch_images_per_second": 99.0}
    progress = progress_from_metrics("pretrain", metrics, 50.0)
    assert (progress.epochs_done, progress.epochs_total, progress.loss, progress.knn_top1) == (5, 15, 2.0, None)
    assert progress.eta_seconds == 100.0
    assert progress_from_metrics("evaluate", {"knn_top1_ssl": 0.9}, 3.0) is None  # a stage that does not train


def test_quiet_terminal_sends_every_kind_of_chatter_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "run.log"
    script = textwrap.dedent(f"""
        import logging, os, sys, warnings
        from pathlib import Path
        from pipelines.console import quiet_terminal
        with quiet_terminal(Path({str(log)!r})) as console:
            print("a worker line (pid=123)")
            os.write(2, b"a C++ warning on fd 2\\n")
            logging.getLogger("ray").warning("a Ray warning")
            warnings.warn("a deprecation", DeprecationWarning)
            console.line("for a person")
        print("after the block")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["for a person", "after the block"]
    assert result.stderr == ""
    logged = log.read_text()
    for chatter in ("a worker line (pid=123)", "a C++ warning on fd 2", "a Ray warning", "a deprecation"):
        assert chatter in logged


def test_monitor_prints_stage_start_epochs_and_finish_from_mlflow(tmp_path: Path) -> None:
    cfg = config_from_mapping({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db",
                                            "artifact_location": str(tmp_path / "artifacts")}}, base=tmp_path)
    parent = tracking.start_run(cfg.tracking, "p/pipeline", {tracking.STAGE_TAG: "pipeline"})
    stage = tracking.start_run(cfg.tracking, "p/pretrain", {tracking.STAGE_TAG: "pretrain"}, parent)
    stream = io.StringIO()
    monitor = ProgressMonitor(cfg.tracking, parent, Console(stream))
    monitor.poll()
    tracking.log_metrics(cfg.tracking, stage, [(0, {EPOCHS_TOTAL: 3})])
    monitor.poll()  # no epoch done yet: nothing new
    tracking.log_metrics(cfg.tracking, stage, [(1, {EPOCHS_DONE: 1, "epoch_loss": 4.5,
                                                    "epoch_images_per_second": 80.0})])
    monitor.poll()
    monitor.poll()  # the same epoch is not printed twice
    tracking.end_run(cfg.tracking, stage)
    monitor.poll()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "  pretrain  started"
    assert re.fullmatch(r"  pretrain  epoch 1/3  loss 4\.5000  images/s 80\.0  ETA \d+ s", lines[1]), lines
    assert re.fullmatch(r"  pretrain  finished in \d+ s", lines[2]), lines
    assert len(lines) == 3
    # A new store shows only sslflow's experiment: MLflow's empty `Default` is deleted (hidden from the UI).
    assert tracking.client_for(cfg.tracking).get_experiment_by_name("Default").lifecycle_stage == "deleted"


@pytest.mark.slow  # inspects the shared pipeline run
def test_a_rerun_that_reuses_every_stage_fits_on_one_screen(quickstart_run, ray_session, tmp_path: Path) -> None:
    """A real `sslflow run` of the shared quickstart's config on a copy of its store: every stage is reused (promote
    always runs; the version is already champion, so no alias moves). The terminal gets the stage lines, the
    summary and the report's path; Ray's and MLflow's output goes to the log file it names."""
    shutil.copy(quickstart_run.workdir / "mlflow.db", tmp_path / "mlflow.db")
    values = {**quickstart_run.values, "tracking": {**quickstart_run.values["tracking"],
                                                    "uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(values))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(config_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = output.splitlines()
    assert len(lines) <= 40, output
    for stage in ("ingest", "pretrain", "evaluate", "finetune", "distill", "register"):
        reused = quickstart_run.result.records[stage].run_id
        assert any(re.fullmatch(rf"  {stage}\s+reuse run {reused}", line) for line in lines), (stage, output)
    assert any(re.fullmatch(r"  promote\s+finished in .*", line) for line in lines), output
    log_path = Path(re.search(r"Ray and MLflow output: (\S+)", output).group(1))
    assert log_path.parent == tmp_path / "logs" and log_path.stat().st_size > 0
    report = Path(re.search(r"^report: (\S+)$", output, re.MULTILINE).group(1))
    assert report.parent == tmp_path / "reports" and report.is_file()
    for chatter in ("WARNING", "Warning", "(pid=", "INFO", "Traceback", "tqdm"):
        assert chatter not in output, (chatter, output)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
