"""Tune spaces (validated against method ranges) and the tune stage on real Ray Tune + Ray Train + MLflow:
nested trial runs, ASHA, best overlay into pretrain, an injected failing trial, every trial failing."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

import ssl_core
from conftest import chromium_browser, console_errors, drawn, table_rows
from pipelines import tracking
from pipelines.faults import FAULTS_ENV
from pipelines.cli import main
from pipelines.config import config_from_mapping
from pipelines.dag import run_pipeline, stages_for
from pipelines.report import write_report
from pipelines.stages.tune import ERRORED, TRIAL_STAGE, error_reason, trial_number, unflatten
from pipelines.tracking import TRIAL_ERROR_TAG, TRIAL_STATE_TAG, TRIAL_TAG
from tune_spaces import domain_from_spec, domain_values, method_search_space, validate_space

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ spaces


@pytest.mark.parametrize("method", ssl_core.available_methods())
def test_every_method_has_a_space_module_inside_its_config_ranges(method: str) -> None:
    module = importlib.import_module(f"tune_spaces.{method}")
    assert (module.METRIC, module.MODE) == ("knn_top1", "max")
    space = module.space(train_rows=50_000)
    validate_space(method, space)
    config_fields = set(ssl_core.methods.METHODS.get(method).Config.__dataclass_fields__)
    assert set(space) <= config_fields


def test_moco_queue_sizes_are_powers_of_two_bounded_by_the_dataset() -> None:
    from tune_spaces import moco

    sizes = moco.space(train_rows=1617)["queue_size"].categories
    assert sizes == [128, 256, 512, 1024]
    assert moco.space(train_rows=10)["queue_size"].categories == [64]
    assert max(moco.space(train_rows=1 << 20)["queue_size"].categories) == 65536


def test_a_domain_outside_the_valid_range_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"method.config.mask_ratio=0.99 is out of range \[0.05, 0.95\]"):
        validate_space("mae", {"mask_ratio": tune.uniform(0.4, 0.99)})
    with pytest.raises(ValueError, match=r"method.config.queue_size=8 is out of range"):
        validate_space("moco", {"queue_size": tune.choice([8, 256])})
    with pytest.raises(ValueError, match="method.config.temprature is not a field"):
        validate_space("simclr", {"temprature": tune.uniform(0.1, 0.5)})
    # randint's upper bound is exclusive: [16, 1<<20 + 1) still lies inside MoCo's range
    validate_space("moco", {"queue_size": tune.randint(16, (1 << 20) + 1)})


def test_yaml_bounds_become_domains_and_are_checked_at_config_load(tmp_path: Path) -> None:
    assert domain_values(domain_from_spec("temperature", {"loguniform": [0.05, 0.5]})) == [0.05, 0.5]
    assert domain_values(domain_from_spec("queue_size", {"choice": [64, 128]})) == [64, 128]
    domains, metric, mode = method_search_space("simclr", 1000, bounds={"temperature": {"uniform": [0.1, 0.2]}})
    assert domain_values(domains["temperature"]) == [0.1, 0.2] and (metric, mode) == ("knn_top1", "max")
    with pytest.raises(ValueError, match="tune.bounds.temperature: unknown kind 'gaussian'"):
        domain_from_spec("temperature", {"gaussian": [0.1, 0.2]})
    with pytest.raises(ValueError, match=r"tune.bounds.temperature.uniform must be \[low, high\]"):
        domain_from_spec("temperature", {"uniform": [0.5, 0.1]})

    def load(tune_section: dict):
        return config_from_mapping({"method": {"name": "simclr"}, "pretrain": {"warmup_epochs": 1},
                                    "tune": {"enabled": True, **tune_section}}, tmp_path)

    with pytest.raises(ValueError, match=r"method.config.temperature=0.001 is out of range \[0.01, 10.0\]"):
        load({"bounds": {"temperature": {"loguniform": [0.001, 0.5]}}})
    with pytest.raises(ValueError, match=r"pretrain.lr=200.0 is out of range"):
        load({"bounds": {"lr": {"uniform": [0.1, 200.0]}}})
    with pytest.raises(ValueError, match="tune.space: cannot import 'no_such_space_module'"):
        load({"space": "no_such_space_module"})
    with pytest.raises(ValueError, match="tune.grace_period=5 exceeds tune.epochs=2"):
        load({"epochs": 2, "grace_period": 5})
    with pytest.raises(ValueError, match="searches nothing"):
        config_from_mapping({"method": {"name": "rotation"}, "finetune": {"head_layers": 0},
                             "pretrain": {"warmup_epochs": 1}, "tune": {"enabled": True}}, tmp_path)
    cfg = load({"search_lr": True, "bounds": {"temperature": {"choice": [0.1, 0.2]}}})
    assert list(stages_for(cfg)) == ["ingest", "tune", "pretrain", "evaluate", "finetune", "distill", "register",
                                     "promote"]
    assert stages_for(cfg)["pretrain"].upstream == ("ingest", "tune")
    off = config_from_mapping({"method": {"name": "simclr"}}, tmp_path)
    assert "tune" not in stages_for(off) and stages_for(off)["pretrain"].upstream == ("ingest",)
    assert list(stages_for(cfg, until="tune")) == ["ingest", "tune"]


def test_unflatten_and_error_reason() -> None:
    assert unflatten({"method.config.temperature": 0.2, "pretrain.lr": 0.1}) == {
        "method": {"config": {"temperature": 0.2}}, "pretrain": {"lr": 0.1}}
    try:
        try:
            raise ValueError("line one\nthe root cause")
        except ValueError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as error:
        assert error_reason(error) == "the root cause"


# ------------------------------------------------------------------------------------------- the stage


def tiny_tune_pipeline(tmp_path: Path, data_path: Path, method: str, method_config: dict, tune_section: dict) -> dict:
    """The quickstart made tiny (ResNet-8, 16 px, batch 32, 1 pretrain epoch) with a search in front of pretrain."""
    values = yaml.safe_load((REPO / "pipelines/configs/quickstart.yaml").read_text())
    values["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "mlartifacts")}
    values["data"]["path"] = str(data_path)
    values["method"] = {"name": method, "config": {"backbone": "resnet8", "projection_hidden_dim": 32,
                                                  "projection_dim": 16, **method_config}}
    values["scaling"].update(cpus_per_worker=0.5, storage_path=str(tmp_path / "runs"))
    values["pretrain"].update(epochs=1, knn_every=1, batch_size=32)  # a MoCo queue of 64 holds a step's 2 x 32 keys
    values["tune"] = {"enabled": True, "cpus_per_worker": 0.5, **tune_section}
    return values


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "digits"


def _children(uri: str, parent_run_id: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sslflow")
    return client.search_runs([experiment.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'")


def _last_metric(uri: str, run_id: str, name: str) -> float:
    history = MlflowClient(uri).get_metric_history(run_id, name)
    return max(history, key=lambda m: m.step).value


def _the_report_shows_the_trials_best_first(cfg, run_id: str, trials: dict, failed, scores: dict, record) -> None:
    """The pipeline run's HTML report, in chromium: the Tune table has one row per trial, best first, with each
    trial's state, searched queue size and last kNN (the errored one with its error), and the plot is drawn."""
    from selenium.webdriver.common.by import By

    page = write_report(cfg.tracking, run_id)
    browser = chromium_browser()
    try:
        browser.get(page.as_uri())
        assert console_errors(browser) == []
        assert drawn(browser, browser.find_element(By.ID, "tune_plot"))
        header = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#tune_trials thead th")]
        rows = [dict(zip(header, cells)) for cells in table_rows(browser, "tune_trials")]
    finally:
        browser.quit()
    assert rows[0]["trial"] == str(trial_number(record.best_trial))
    shown = {f"trial-{int(row['trial']):03d}": row for row in rows}
    assert set(shown) == {*trials, "trial-002"}
    assert shown["trial-002"]["state"] == ERRORED and "injected failure in trial 2" in shown["trial-002"]["error"]
    for name, trial in {**trials, "trial-002": failed}.items():
        assert shown[name]["method.config.queue_size"] == trial.data.params["method.config.queue_size"]
    for name, trial in trials.items():
        assert shown[name]["state"] == trial.data.tags[TRIAL_STATE_TAG]
        assert shown[name]["knn_top1"] == f"{scores[name]:.4f}"


@pytest.mark.slow
def test_search_records_trials_survives_an_errored_one_and_feeds_pretrain(ray_session, tmp_path: Path,
                                                                          data_path: Path, capsys,
                                                                          monkeypatch) -> None:
    """3 MoCo trials over queue size and temperature, 2 epochs, ASHA; trial 2 fails on purpose (SSLFLOW_FAULTS).
    The configured queue (128) is not among the choices, so the fine-tune after the search loads a checkpoint
    whose queue has another size, which it can only do with the searched config."""
    monkeypatch.setenv(FAULTS_ENV, '{"tune_fail_trial": 2}')
    values = tiny_tune_pipeline(tmp_path, data_path, "moco", {"queue_size": 128}, {
        "num_samples": 3, "epochs": 2, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
        "bounds": {"queue_size": {"choice": [64, 256, 512]}, "temperature": {"loguniform": [0.05, 0.5]},
                   "momentum": {"uniform": [0.9, 0.99]}},
    })
    cfg = config_from_mapping(values)
    result = run_pipeline(cfg, until="pretrain")
    uri = cfg.tracking.uri
    stages = {run.data.tags[tracking.STAGE_TAG]: run for run in _children(uri, result.run_id)}
    assert set(stages) == {"ingest", "tune", "pretrain"}
    tune_run = stages["tune"]
    trials = {t.data.tags["mlflow.runName"]: t for t in _children(uri, tune_run.info.run_id)}
    assert set(trials) == {f"{cfg.name}/tune/trial-{number:03d}" for number in range(3)}
    trials = {name.rsplit("/", 1)[-1]: t for name, t in trials.items()}
    assert all(t.data.tags[tracking.STAGE_TAG] == TRIAL_STAGE for t in trials.values())
    searched = [(t.data.params["method.config.queue_size"], t.data.params["method.config.temperature"])
                for t in trials.values()]
    assert len(set(searched)) == 3

    failed = trials.pop("trial-002")
    assert failed.info.status == "FAILED" and failed.data.tags[TRIAL_STATE_TAG] == ERRORED
    assert "injected failure in trial 2" in failed.data.tags[TRIAL_ERROR_TAG]
    states = {t.data.tags[TRIAL_STATE_TAG] for t in trials.values()}
    assert states <= {"completed", "stopped_early"} and "completed" in states
    assert all(t.data.metrics.get("epoch_knn_top1") is not None for t in trials.values())

    scores = {name: _last_metric(uri, t.info.run_id, "knn_top1") for name, t in trials.items()}
    record = result.records["tune"]
    best_name, best = next((name, t) for name, t in trials.items() if t.data.tags[TRIAL_TAG] == record.best_trial)
    assert scores[best_name] == max(scores.values())  # the argmax (ties: the earliest trial)
    best_overlay = {"queue_size": int(best.data.params["method.config.queue_size"]),
                    "temperature": float(best.data.params["method.config.temperature"]),
                    "momentum": float(best.data.params["method.config.momentum"])}
    assert record.config_overlay == {"method": {"config": best_overlay}}
    assert record.best_value == pytest.approx(max(scores.values()))
    assert record.trials == {"completed": sum(t.data.tags[TRIAL_STATE_TAG] == "completed" for t in trials.values()),
                                "stopped_early": sum(t.data.tags[TRIAL_STATE_TAG] == "stopped_early"
                                                     for t in trials.values()),
                                "errored": 1}
    assert float(tune_run.data.params["best.method.config.temperature"]) == pytest.approx(best_overlay["temperature"])
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(tune_run.info.run_id, "tune")}
    assert artifacts == {"tune/tune_results.csv", "tune/tune_knn_top1_vs_params.png"}
    _the_report_shows_the_trials_best_first(cfg, result.run_id, trials, failed, scores, record)

    pretrain_run = stages["pretrain"]
    assert int(pretrain_run.data.params["method.config.queue_size"]) == best_overlay["queue_size"]
    assert float(pretrain_run.data.params["method.config.temperature"]) == pytest.approx(best_overlay["temperature"])
    assert pretrain_run.data.tags[tracking.UPSTREAM_TAG] == (
        f'{{"ingest": "{stages["ingest"].info.run_id}", "tune": "{tune_run.info.run_id}"}}')

    # a second run reuses the search and the pretraining that consumed it, and fine-tunes the searched method
    values["evaluate"] = {"linear_probe_epochs": 1}
    values["finetune"].update(epochs=1, batch_size=32)
    cfg = config_from_mapping(values)
    again = run_pipeline(cfg, until="finetune")
    assert {p.name for p in again.plan if p.reused is not None} == {"ingest", "tune", "pretrain"}
    assert again.records["pretrain"].config_overlay == record.config_overlay
    finetuned = MlflowClient(uri).get_run(again.records["finetune"].run_id)
    assert finetuned.info.status == "FINISHED"
    # `sslflow tune` prints the search's table
    config_file = tmp_path / "moco.yaml"
    config_file.write_text(yaml.safe_dump(values))
    capsys.readouterr()
    assert main(["tune", str(config_file)]) == 0
    printed = capsys.readouterr().out
    log_path = Path(re.search(r"Ray and MLflow output: (\S+)", printed).group(1))  # quiet, as `sslflow run` is
    assert log_path.parent == tmp_path / "logs" and log_path.is_file()
    assert f"3 trials ({record.trials['completed']} completed" in printed and "1 errored" in printed
    assert "injected failure in trial 2" in printed and "queue_size" in printed


@pytest.mark.slow
def test_a_search_whose_every_trial_fails_fails_the_stage_with_the_reasons(ray_session, tmp_path: Path,
                                                                          data_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, '{"tune_fail_trial": 0}')
    values = tiny_tune_pipeline(tmp_path, data_path, "simclr", {}, {"num_samples": 1, "epochs": 1})
    cfg = config_from_mapping(values)
    with pytest.raises(Exception, match=r"every one of the 1 trials failed: trial 0: .*injected failure in trial 0"):
        run_pipeline(cfg, until="tune")
    tune_run = tracking.search_runs(cfg.tracking, f"tags.`{tracking.STAGE_TAG}` = 'tune'")[0]
    assert tune_run.info.status == "FAILED"
