"""The HTML report of the shared quickstart run, opened in a real browser (Debian's chromium driven by Selenium), and
`sslflow show` of the same run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from conftest import chromium_browser, console_errors, drawn, table_rows
from pipelines import tracking
from pipelines.cli import main
from pipelines.datasets import load_split_tensors
from pipelines.report import REPORT_ARTIFACT_DIR, REPORT_FILE, confusion_matrix, write_report


def test_confusion_matrix_counts_true_by_predicted() -> None:
    matrix = confusion_matrix(predicted=[0, 1, 1, 2, 0], labels=[0, 1, 2, 2, 1], num_classes=3)
    assert matrix == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]


@pytest.fixture(scope="module")
def report(quickstart_run) -> Path:
    return write_report(quickstart_run.cfg.tracking, quickstart_run.result.run_id)


@pytest.mark.slow  # inspects the shared pipeline run
def test_report_is_logged_and_written_beside_the_database(quickstart_run, report: Path) -> None:
    run_id = quickstart_run.result.run_id
    assert report == quickstart_run.workdir / "reports" / f"{quickstart_run.cfg.name}-{run_id}.html"
    logged = dict(tracking.list_artifacts(quickstart_run.cfg.tracking, run_id, REPORT_ARTIFACT_DIR))
    assert logged[f"{REPORT_ARTIFACT_DIR}/{REPORT_FILE}"] == report.stat().st_size


@pytest.mark.slow  # inspects the shared pipeline run
def test_report_opens_in_a_browser_with_every_image_and_the_runs_numbers(quickstart_run, report: Path) -> None:
    from selenium.webdriver.common.by import By

    records = quickstart_run.result.records
    browser = chromium_browser()
    try:
        browser.get(report.as_uri())
        assert console_errors(browser) == []
        images = browser.find_elements(By.TAG_NAME, "img")
        assert {image.get_attribute("id") for image in images} == {"curves", "embedding", "label_efficiency_plot",
                                                                   "confusion"}
        for image in images:
            assert drawn(browser, image), image.get_attribute("id")

        stages = {row[0]: row for row in table_rows(browser, "stages")}
        assert list(stages) == list(records)  # DAG order, tune switched off
        for name, record in records.items():
            assert stages[name][1] == "FINISHED" and stages[name][3] == record.run_id

        evaluate = records["evaluate"].metrics
        assert table_rows(browser, "evaluation") == [
            [name, f"{evaluate[f'{key}_random']:.4f}", f"{evaluate[f'{key}_ssl']:.4f}"]
            for name, key in (("kNN top-1", "knn_top1"), ("kNN top-5", "knn_top5"), ("linear probe top-1",
                                                                                     "linear_top1"))]
        finetune = records["finetune"].metrics
        assert table_rows(browser, "label_efficiency") == [
            [fraction, f"{finetune[f'test_top1_fraction_{fraction}']:.4f}"] for fraction in ("0.05", "0.1")]

        promote = records["promote"]
        assert table_rows(browser, "promotion") == [[promote.model_name, promote.version,
                                                     "yes" if promote.promoted else "no",
                                                     str(promote.champion_version), promote.reason]]

        # The confusion matrix is the student's on the labeled test rows: its diagonal is the distill stage's top-1.
        matrix = [[int(cell) for cell in row[1:]] for row in table_rows(browser, "confusion_table")]
        _, labels = load_split_tensors(quickstart_run.cfg.data.path, "test", quickstart_run.cfg.data.image_size)
        assert sum(map(sum, matrix)) == len(labels)
        assert [sum(row) for row in matrix] == [int((labels == c).sum()) for c in range(len(matrix))]
        diagonal = sum(matrix[c][c] for c in range(len(matrix)))
        assert diagonal / len(labels) == pytest.approx(records["distill"].metrics["test_top1"], abs=1e-6)
    finally:
        browser.quit()


@pytest.mark.slow  # inspects the shared pipeline run
def test_show_prints_stages_metrics_artifacts_and_registry_versions(quickstart_run, tmp_path: Path,
                                                                    capsys) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(quickstart_run.values))
    records = quickstart_run.result.records
    assert main(["show", quickstart_run.result.run_id, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    for name, record in records.items():
        assert any(line.split()[:2] == [name, "FINISHED"] and line.split()[-1] == record.run_id
                   for line in out.splitlines()), (name, out)
    assert f"knn_top1_ssl={records['evaluate'].metrics['knn_top1_ssl']:.4f}" in out
    assert "plots/test_embeddings_pca.png" in out and "plots/label_efficiency.png" in out
    register = records["register"]
    assert f"{register.model_name}/{register.version}  (" in out
    assert f"{register.model_name}-teacher/{register.teacher_version}  (" in out

    assert main(["show", "0123456789abcdef", "--config", str(config)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"sslflow: error: no MLflow run '0123456789abcdef' in {quickstart_run.cfg.tracking.uri}"
    assert err[1].startswith("sslflow: `sslflow ls` lists the pipeline runs of this store")
    assert main(["show", records["pretrain"].run_id, "--config", str(config)]) == 2
    assert f"its pipeline run is {quickstart_run.result.run_id}" in capsys.readouterr().err


def test_a_block_shorter_than_the_sampling_interval_still_logs_its_system_metrics(tmp_path: Path) -> None:
    """``tracking.system_metrics`` logs one sample when its block ends, however short the block (MLflow's own
    monitor logs only after a whole interval, and drops what it collected when stopped before)."""
    from pipelines.config import TrackingConfig

    config = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art"))
    client = tracking.client_for(config)
    run_id = client.create_run(client.create_experiment("system", str(tmp_path / "art"))).info.run_id
    started = time.monotonic()
    with tracking.system_metrics(config, run_id, "rank3"):
        pass
    assert time.monotonic() - started < tracking.SYSTEM_METRICS_INTERVAL_SECONDS
    metrics = client.get_run(run_id).data.metrics
    assert 0.0 <= metrics["system/rank3/cpu_utilization_percentage"] <= 100.0
    assert metrics["system/rank3/system_memory_usage_megabytes"] > 0.0


@pytest.mark.slow  # inspects the shared pipeline run
def test_training_stages_log_system_metrics_per_worker(quickstart_run) -> None:
    """MLflow's system metrics (CPU, memory) sampled on each Ray Train worker, named by its rank."""
    pretrain = tracking.get_run(quickstart_run.cfg.tracking, quickstart_run.result.records["pretrain"].run_id)
    metrics = pretrain.data.metrics
    assert 0.0 <= metrics["system/rank0/cpu_utilization_percentage"] <= 100.0
    assert metrics["system/rank0/system_memory_usage_megabytes"] > 0.0
