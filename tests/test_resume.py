"""Work an earlier run left unfinished, on real Ray and real MLflow: a killed Ray Train worker is replaced and
resumes with the checkpoint's weights, a killed driver's pretraining resumes from its last checkpoint that loads,
runs a dead driver left RUNNING end KILLED, and a finished stage whose artifacts are gone is not reused.

The faults come from ``SSLFLOW_FAULTS`` (``pipelines.faults``): ``pretrain_hold_at_step`` / ``_epoch`` park every
worker after a given step or at the start of an epoch, so that a test kills the driver or a worker there, not at a
moment chosen by timing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import shrunk_quickstart
from pipelines import faults, guardian, resume, storage, tracking
from pipelines.cli import main
from pipelines.config import config_from_mapping
from pipelines.train_loop import CHECKPOINT_FILE

EPOCHS = 4
LOSS_TOLERANCE = 0.08
"""Relative tolerance between a resumed run's per-epoch loss and an independent uninterrupted run's with the same
seed: a sanity bound only. Two uninterrupted runs are not bit-identical (measured on this shared 2-core machine:
up to 4.4% apart at epoch 1 and 4.8% at epoch 3); a run that restarted from a fresh model would sit near epoch 1's
loss, 9-11% above epoch 3's. The strict check of the restored state: from the same epoch-2 checkpoint, the driver's
rerun repeats the epoch-3 loss of the worker group that Ray Train restarted, to the last bit (measured: equal)."""


# ------------------------------------------------------------------------------------------------ without Ray


def test_faults_come_from_the_environment_and_are_parsed_strictly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(faults.FAULTS_ENV, raising=False)
    assert faults.active() == faults.Faults() and faults.runtime_env() is None
    monkeypatch.setenv(faults.FAULTS_ENV, json.dumps({"pretrain_nan_at_step": 3}))
    assert faults.active().pretrain_nan_at_step == 3
    assert faults.runtime_env() == {"env_vars": {faults.FAULTS_ENV: '{"pretrain_nan_at_step": 3}'}}
    with pytest.raises(ValueError, match="unknown key 'pretrain_fail'"):
        faults.parse('{"pretrain_fail": 1}')
    with pytest.raises(ValueError, match="tune_fail_trial must be int"):
        faults.parse('{"tune_fail_trial": "2"}')
    with pytest.raises(ValueError, match="pretrain_hold_at_step needs once_dir"):
        faults.parse('{"pretrain_hold_at_step": 2}')
    with pytest.raises(RuntimeError, match="injected failure in trial 2"):
        faults.fail_trial(faults.parse('{"tune_fail_trial": 2}'), 2)
    faults.fail_trial(faults.parse('{"tune_fail_trial": 2}'), 1)
    # the hold fires once per Train run and rank, and leaves its marker in once_dir, nowhere else
    hold = faults.parse(json.dumps({"pretrain_hold_at_step": 5, "hold_seconds": 0, "once_dir": str(tmp_path / "f")}))
    faults.hold_at_step(hold, "pretrain-x", 4, 0)
    assert not (tmp_path / "f").exists()
    faults.hold_at_step(hold, "pretrain-x", 5, 1)
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["pretrain-x.hold.step.rank1"]
    # a run may hold twice: at a step, then at an epoch's start, each with its own marker
    both = faults.parse(json.dumps({"pretrain_hold_at_step": 5, "pretrain_hold_at_epoch": 2, "hold_seconds": 0,
                                    "once_dir": str(tmp_path / "g")}))
    faults.hold_at_step(both, "pretrain-y", 5, 0)
    faults.hold_at_epoch(both, "pretrain-y", 0, 0)  # epoch 1: no hold
    faults.hold_at_epoch(both, "pretrain-y", 1, 0)
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["pretrain-y.hold.epoch.rank0",
                                                                 "pretrain-y.hold.step.rank0"]


def _tracking_cfg(tmp_path: Path):
    return config_from_mapping({
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "artifacts")},
        "scaling": {"storage_path": str(tmp_path / "runs")},
    }, base=tmp_path)


def _write_checkpoint(folder: Path, epoch: int) -> Path:
    folder.mkdir(parents=True)
    path = folder / CHECKPOINT_FILE
    torch.save({"model": {"w": torch.full((64, 64), float(epoch))}, "optimizer": {}, "epoch": epoch,
                "step": 10 * epoch}, path)
    return path


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one_and_none_starts_over(tmp_path: Path) -> None:
    cfg = _tracking_cfg(tmp_path)
    stage_tags = {tracking.STAGE_TAG: "pretrain", tracking.FINGERPRINT_TAG: "fp1"}
    killed = tracking.start_run(cfg.tracking, "pretrain", stage_tags)
    tracking.end_run(cfg.tracking, killed, "KILLED")
    other_fingerprint = tracking.start_run(cfg.tracking, "pretrain", {**stage_tags, tracking.FINGERPRINT_TAG: "fp2"})
    tracking.end_run(cfg.tracking, other_fingerprint, "FAILED")
    finished = tracking.start_run(cfg.tracking, "pretrain", stage_tags)
    tracking.end_run(cfg.tracking, finished, "FINISHED")
    new = tracking.start_run(cfg.tracking, "pretrain", stage_tags)
    assert resume.earlier_attempts(cfg.tracking, new) == [killed]

    train_run = tmp_path / "runs" / f"pretrain-{killed}"
    _write_checkpoint(train_run / "checkpoint_2026-12-02_01-00-01.000001", 1)
    newest = _write_checkpoint(train_run / "checkpoint_2026-12-02_01-00-02.000001", 2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated mid-write
    (train_run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own file: not a checkpoint
    lines: list[str] = []
    point = resume.resume_point(cfg, "pretrain", new, [killed], "pretrain", echo=lines.append)
    assert point == resume.ResumePoint(killed, str(train_run / "checkpoint_2026-12-02_01-00-01.000001"), 1, 10)
    assert lines[0].startswith(f"pretrain: warning: checkpoint {newest} does not load (")
    assert lines[1] == f"pretrain: resuming run {killed} from epoch 1 checkpoint"
    tag = json.loads(tracking.get_run(cfg.tracking, new).data.tags[resume.RESUMED_FROM_TAG])
    assert tag == {"run_id": killed, "epoch": 1, "checkpoint": point.checkpoint}

    (train_run / "checkpoint_2026-12-02_01-00-01.000001" / CHECKPOINT_FILE).write_bytes(b"")  # zero bytes
    lines.clear()
    assert resume.resume_point(cfg, "pretrain", new, [killed], "pretrain", echo=lines.append) is None
    assert len(lines) == 3 and lines[-1] == f"pretrain: starting over: no checkpoint of run(s) {killed} loads"
    lines.clear()  # an attempt that never checkpointed: a fresh start, nothing to say
    assert resume.resume_point(cfg, "pretrain", new, [other_fingerprint], "pretrain", echo=lines.append) is None
    assert lines == []


def test_runs_left_running_by_a_dead_driver_end_killed_and_a_live_drivers_stay(tmp_path: Path) -> None:
    cfg = _tracking_cfg(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead_identity = json.dumps({**json.loads(resume.driver_identity()), "pid": gone.pid})

    def pipeline(identity: str) -> tuple[str, str, str, str]:
        parent = tracking.start_run(cfg.tracking, "pipeline", {tracking.STAGE_TAG: "pipeline",
                                                               resume.DRIVER_TAG: identity})
        done = tracking.start_run(cfg.tracking, "ingest", {tracking.STAGE_TAG: "ingest"}, parent)
        tracking.end_run(cfg.tracking, done, "FINISHED")
        stage = tracking.start_run(cfg.tracking, "finetune", {tracking.STAGE_TAG: "finetune"}, parent)
        fraction = tracking.start_run(cfg.tracking, "finetune-0.1", {tracking.STAGE_TAG: "finetune_fraction"}, stage)
        return parent, done, stage, fraction

    dead, live = pipeline(dead_identity), pipeline(resume.driver_identity())
    lines: list[str] = []
    assert resume.close_dead_runs(cfg.tracking, lines.append) == [dead[0]]
    client = MlflowClient(cfg.tracking.uri)
    assert [client.get_run(r).info.status for r in dead] == ["KILLED", "FINISHED", "KILLED", "KILLED"]
    assert [client.get_run(r).info.status for r in live] == ["RUNNING", "FINISHED", "RUNNING", "RUNNING"]
    reason = client.get_run(dead[3]).data.tags[resume.KILLED_REASON_TAG]
    assert reason == f"its driver (pid {gone.pid} on {json.loads(dead_identity)['host']}) died"
    assert lines == [f"pipeline run {dead[0]} was left RUNNING ({reason}): ended KILLED with 2 run(s) under it"]


# --------------------------------------------------------------------------------------------- on real Ray


def _pretrain_values(tmp_path: Path) -> dict:
    """The quickstart shrunk to a 4-epoch, 2-worker ResNet-8 pretraining at 16 px with a checkpoint every epoch."""
    values = shrunk_quickstart(tmp_path, tmp_path / "digits")
    values["scaling"]["num_workers"] = 2
    values["pretrain"].update(epochs=EPOCHS, batch_size=64, knn_every=EPOCHS, checkpoint_every=1, warmup_epochs=1)
    return values


def _history(cfg, run_id: str, key: str) -> list[tuple[int, float]]:
    return tracking.metric_history(cfg.tracking, run_id, key)


def _stage_run(cfg, stage: str, status: str | None = None):
    extra = f" and attributes.status = '{status}'" if status else ""
    runs = tracking.search_runs(cfg.tracking, f"tags.`{tracking.STAGE_TAG}` = '{stage}'{extra}")
    return runs[0] if runs else None


def _wait(what: str, condition, timeout: float, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the pipeline exited with {process.returncode} before {what}")
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _holding(once_dir: Path, world_size: int, kind: str):
    """Every worker parked by ``pretrain_hold_at_<kind>``: the Train run name (``pretrain-<run id>``)."""
    markers = list(once_dir.glob(f"*.hold.{kind}.rank*")) if once_dir.exists() else []
    return markers[0].name.split(".hold.")[0] if len(markers) == world_size else None


@dataclass(frozen=True)
class Uninterrupted:
    """The uninterrupted pretraining every resumed run here is compared with."""

    epoch_loss: list[tuple[int, float]]
    steps_per_epoch: int


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory) -> Uninterrupted:
    from pipelines.dag import run_pipeline

    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    cfg = config_from_mapping(_pretrain_values(tmp_path), base=tmp_path)
    run_id = run_pipeline(cfg, until="pretrain").records["pretrain"].run_id
    losses = _history(cfg, run_id, "epoch_loss")
    assert [epoch for epoch, _ in losses] == list(range(1, EPOCHS + 1))
    [steps] = {int(value) for _, value in _history(cfg, run_id, "steps_per_epoch")}
    return Uninterrupted(losses, steps)


def _assert_losses_match(resumed: list[tuple[int, float]], reference: Uninterrupted) -> None:
    expected = dict(reference.epoch_loss)
    assert resumed, "no per-epoch loss logged"
    for epoch, loss in resumed:
        assert loss == pytest.approx(expected[epoch], rel=LOSS_TOLERANCE), (epoch, resumed, reference.epoch_loss)


def _descendants(pid: int) -> dict[psutil.Process, str]:
    """The live descendants of ``pid`` and their titles (``ray::RayTrainWorker...``: the first word of the command)."""
    found = {}
    for process in psutil.Process(pid).children(recursive=True):
        try:
            found[process] = (process.cmdline() or [""])[0]
        except psutil.NoSuchProcess:
            pass
    return found


def _ray_train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    return [actor.pid for actor in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                        ("state", "=", "ALIVE")])]


@pytest.mark.slow
def test_a_killed_worker_then_a_killed_driver_resume_pretraining_from_checkpoints_that_load(ray_session,
                                                                                          uninterrupted,
                                                                                          tmp_path: Path) -> None:
    """One `sslflow run` of 4 epochs (checkpoints every epoch, 2 kept), two faults:

    1. SIGKILL of a RayTrainWorker mid-epoch 3: Ray Train restarts the worker group (max_failures 1), which resumes
       from the epoch-2 checkpoint and trains epoch 3 again;
    2. SIGKILL of the driver at the start of epoch 4 (checkpoints of epochs 2 and 3 kept); the newest is truncated.
       The driver started its own local Ray, as `sslflow run` does on a laptop: within seconds no process it started
       is left (``pipelines.guardian``; Ray alone leaves its agents up for a minute).

    The rerun (on the session's Ray) closes the dead runs, falls back to epoch 2 and repeats the restarted group's
    epoch 3 exactly; both resumed epochs match the uninterrupted run, which a resume without the checkpoint's weights
    or optimizer state would not."""
    from pipelines.dag import run_pipeline

    values = _pretrain_values(tmp_path)
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(values))
    cfg = config_from_mapping(values, base=tmp_path)
    tracking.ensure_experiment(cfg.tracking)
    steps = uninterrupted.steps_per_epoch
    once_dir = tmp_path / "faults"
    hold = {"pretrain_hold_at_step": 2 * steps + steps // 2, "pretrain_hold_at_epoch": 4, "once_dir": str(once_dir)}
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, faults.FAULTS_ENV: json.dumps(hold)}
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(config_path)], cwd=tmp_path, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started: dict[psutil.Process, str] = {}
    try:
        _wait("pretrain to hold mid-epoch 3", lambda: _holding(once_dir, 2, "step"), 240, driver)
        workers = [p for p, title in _descendants(driver.pid).items() if title.startswith("ray::RayTrainWorker")]
        assert len(workers) == 2, workers
        workers[-1].kill()
        train_run = _wait("the restarted workers to hold at epoch 4", lambda: _holding(once_dir, 2, "epoch"), 240,
                          driver)
        started = _descendants(driver.pid)  # its local Ray: GCS, raylet, dashboard, agents, workers
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert "ray::DashboardAgent" in started.values(), started

    def lingering() -> list[str]:
        return [f"{process.pid} {title}" for process, title in started.items() if guardian.alive(process)]

    try:
        _wait("every process the killed driver started to end", lambda: not lingering(), 20)
    except AssertionError:
        raise AssertionError(f"alive 20 s after the driver was killed: {lingering()}") from None
    killed = _stage_run(cfg, "pretrain")
    assert train_run == f"pretrain-{killed.info.run_id}" and killed.info.status == "RUNNING"
    # the restarted group: from epoch 2's checkpoint, epoch 3 once in the history, no step repeated or skipped
    assert _history(cfg, killed.info.run_id, "resumed_from_epoch") == [(2 * steps, 2.0)]
    assert [s for s, _ in _history(cfg, killed.info.run_id, "train_loss")] == list(range(3 * steps)), \
        "steps restarted or repeated"
    killed_losses = _history(cfg, killed.info.run_id, "epoch_loss")
    assert [epoch for epoch, _ in killed_losses] == [1, 2, 3]
    _assert_losses_match(killed_losses[2:], uninterrupted)

    folders = sorted(path for path in (tmp_path / "runs" / train_run).glob("checkpoint_*") if path.is_dir())
    assert [torch.load(f / CHECKPOINT_FILE, weights_only=True)["epoch"] for f in folders[-2:]] == [2, 3]
    newest = folders[-1] / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:1000])

    result = run_pipeline(cfg, until="pretrain")
    client = MlflowClient(cfg.tracking.uri)
    old = client.get_run(killed.info.run_id)
    assert old.info.status == "KILLED" and "its driver (pid" in old.data.tags[resume.KILLED_REASON_TAG]
    assert client.get_run(old.data.tags[tracking.PARENT_TAG]).info.status == "KILLED"
    rerun = result.records["pretrain"].run_id
    assert rerun != killed.info.run_id
    resumed_from = json.loads(client.get_run(rerun).data.tags[resume.RESUMED_FROM_TAG])
    assert resumed_from == {"run_id": killed.info.run_id, "epoch": 2, "checkpoint": str(folders[-2])}
    assert _history(cfg, rerun, "resumed_from_epoch") == [(2 * steps, 2.0)]
    assert [s for s, _ in _history(cfg, rerun, "train_loss")] == list(range(2 * steps, EPOCHS * steps))
    losses = _history(cfg, rerun, "epoch_loss")
    assert [epoch for epoch, _ in losses] == [3, 4]
    # Epoch 3 again from the same epoch-2 state (model, optimizer, step, RNG): the restarted group's loss, exactly.
    assert losses[0][1] == pytest.approx(dict(killed_losses)[3], rel=1e-6), (losses, killed_losses)
    _assert_losses_match(losses, uninterrupted)
    assert result.records["pretrain"].metrics["step"] == EPOCHS * steps


def _process_group(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except ProcessLookupError:
                pass
    return members


@pytest.mark.slow
def test_ctrl_c_ends_the_runs_killed_prints_one_line_and_exits_130(ray_session, tmp_path: Path) -> None:
    values = _pretrain_values(tmp_path)
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(values))
    cfg = config_from_mapping(values, base=tmp_path)
    tracking.ensure_experiment(cfg.tracking)  # the store exists before the driver starts, as for a user's rerun
    once_dir = tmp_path / "faults"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           faults.FAULTS_ENV: json.dumps({"pretrain_hold_at_epoch": 2, "once_dir": str(once_dir)})}
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(config_path)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait("pretrain to hold at epoch 2", lambda: _holding(once_dir, 2, "epoch"), 240, driver)
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C sends: the terminal's foreground process group
        stdout, stderr = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, (stdout, stderr)
    assert stderr.splitlines() == ["sslflow: interrupted (Ctrl-C): the runs in progress ended KILLED; run the same "
                                   "command again to resume"], stderr
    client = MlflowClient(cfg.tracking.uri)
    pretrain_run = _stage_run(cfg, "pretrain")
    assert pretrain_run.info.status == "KILLED"
    assert client.get_run(pretrain_run.data.tags[tracking.PARENT_TAG]).info.status == "KILLED"
    assert _stage_run(cfg, "pipeline", "RUNNING") is None
    # Nothing the pipeline started outlives it: its process group and its Ray Train workers are gone.
    assert _wait("the Ray Train workers to end", lambda: not _ray_train_worker_pids() or None, 60) is True
    assert _process_group(driver.pid) == []


# ---------------------------------------------------------------- reuse needs the artifacts, not only FINISHED


def _copy_store(quickstart_run, destination: Path) -> dict:
    """A copy of the shared run's MLflow store (database and artifacts) at ``destination``, every absolute path in
    the database pointing into the copy; returns the config mapping that reads it (same data, same fingerprints)."""
    source = quickstart_run.workdir
    shutil.copy(source / "mlflow.db", destination / "mlflow.db")
    shutil.copytree(source / "mlartifacts", destination / "mlartifacts")
    with sqlite3.connect(destination / "mlflow.db") as database:
        tables = [row[0] for row in database.execute("select name from sqlite_master where type = 'table'")]
        for table in tables:
            for column in database.execute(f"pragma table_info('{table}')").fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT")):
                    database.execute(f'update "{table}" set "{column[1]}" = replace("{column[1]}", ?, ?)',
                                     (str(source), str(destination)))
    values = json.loads(json.dumps(quickstart_run.values))
    values["tracking"] = {"uri": f"sqlite:///{destination}/mlflow.db",
                          "artifact_location": str(destination / "mlartifacts")}
    return values


def _dry_run(values: dict, path: Path, capsys) -> dict[str, str]:
    path.write_text(yaml.safe_dump(values))
    capsys.readouterr()
    assert main(["run", str(path), "--dry-run"]) == 0
    lines = [line.split(None, 2) for line in capsys.readouterr().out.splitlines()[1:]]
    return {stage: reason for stage, _, reason in lines}


@pytest.mark.slow
def test_a_finished_stage_whose_artifacts_are_damaged_is_rerun_and_the_plan_says_why(quickstart_run,
                                                                                    tmp_path: Path, capsys) -> None:
    values = _copy_store(quickstart_run, tmp_path)
    config = tmp_path / "copy.yaml"
    plan = _dry_run(values, config, capsys)
    assert all(reason.startswith("reuse run") for stage, reason in plan.items() if stage != "promote"), plan
    cfg = config_from_mapping(values, base=tmp_path)
    record = quickstart_run.result.records["pretrain"]
    pretrain_id = record.run_id

    # the pretrain checkpoint truncated: pretrain reruns, and everything downstream of it
    artifact_root = storage.locate(tracking.get_run(cfg.tracking, pretrain_id).info.artifact_uri).path
    checkpoint = Path(artifact_root) / "checkpoints" / CHECKPOINT_FILE
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    plan = _dry_run(values, config, capsys)
    assert plan["ingest"].startswith("reuse run")
    assert plan["pretrain"] == (f"run: artifact runs:/{pretrain_id}/checkpoints/{CHECKPOINT_FILE} of run "
                                f"{pretrain_id} changed since the run finished (checksum mismatch)")
    assert plan["evaluate"].startswith("run: upstream pretrain runs again (run ")
    assert plan["finetune"].startswith("run: upstream pretrain runs again (run ")

    # the logged encoder deleted as well: named first (the record's URIs are checked in order)
    model_id = record.encoder_uri.removeprefix("models:/")
    encoder = storage.locate(MlflowClient(cfg.tracking.uri).get_logged_model(model_id).artifact_location)
    shutil.rmtree(encoder.path)
    plan = _dry_run(values, config, capsys)
    assert plan["pretrain"] == f"run: artifact {record.encoder_uri} of run {pretrain_id} is missing"


@pytest.mark.slow
def test_killed_finetune_and_distill_attempts_resume_from_their_checkpoints(quickstart_run, tmp_path: Path) -> None:
    """The shared run's finetune (2 epochs per fraction, FixMatch) and distill (1 epoch) stages, ended KILLED in a
    copy of its store and Train folders, with fraction 0.05's newest checkpoint truncated: the rerun resumes fraction
    0.05 from epoch 1 and trains epoch 2 only, fraction 0.1 and distill from their last checkpoints (nothing left to
    train), and each says where it resumed from."""
    from pipelines.dag import run_pipeline
    from pipelines.ray_train import train_run_name
    from pipelines.stages.finetune import FRACTION_STAGE_TAG

    values = _copy_store(quickstart_run, tmp_path)
    shutil.copytree(quickstart_run.workdir / "runs", tmp_path / "runs")
    values["scaling"]["storage_path"] = str(tmp_path / "runs")  # not part of any fingerprint: every stage reusable
    cfg = config_from_mapping(values, base=tmp_path)
    records = quickstart_run.result.records
    old_finetune, old_distill = records["finetune"].run_id, records["distill"].run_id
    old_fractions = {run.data.params["label_fraction"]: run.info.run_id for run in tracking.search_runs(
        cfg.tracking, f"tags.`{tracking.PARENT_TAG}` = '{old_finetune}' and "
                      f"tags.`{tracking.STAGE_TAG}` = '{FRACTION_STAGE_TAG}'")}
    assert set(old_fractions) == {"0.05", "0.1"}
    for run_id in [old_finetune, old_distill, *old_fractions.values()]:
        tracking.end_run(cfg.tracking, run_id, "KILLED")
    folders = sorted(path for path in (tmp_path / "runs" / train_run_name("finetune", old_fractions["0.05"]))
                     .glob("checkpoint_*") if path.is_dir())
    assert [torch.load(f / CHECKPOINT_FILE, weights_only=True)["epoch"] for f in folders] == [1, 2]
    newest = folders[-1] / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:1000])

    result = run_pipeline(cfg, until="distill")
    assert {p.name for p in result.plan if p.reused is not None} == {"ingest", "pretrain", "evaluate"}
    new_fractions = {run.data.params["label_fraction"]: run for run in tracking.search_runs(
        cfg.tracking, f"tags.`{tracking.PARENT_TAG}` = '{result.records['finetune'].run_id}' and "
                      f"tags.`{tracking.STAGE_TAG}` = '{FRACTION_STAGE_TAG}'")}
    resumed = {fraction: json.loads(run.data.tags[resume.RESUMED_FROM_TAG]) for fraction, run in new_fractions.items()}
    assert resumed["0.05"] == {"run_id": old_fractions["0.05"], "epoch": 1, "checkpoint": str(folders[0])}
    assert resumed["0.1"]["run_id"] == old_fractions["0.1"] and resumed["0.1"]["epoch"] == 2
    history = {fraction: {key: _history(cfg, run.info.run_id, key) for key in ("resumed_from_epoch", "epochs_done")}
               for fraction, run in new_fractions.items()}
    assert [v for _, v in history["0.05"]["resumed_from_epoch"]] == [1.0]
    assert history["0.05"]["epochs_done"] == [(2, 2.0)]  # epoch 2 only, from the epoch-1 state
    assert [v for _, v in history["0.1"]["resumed_from_epoch"]] == [2.0] and history["0.1"]["epochs_done"] == []
    assert all(0.0 <= run.data.metrics["test_top1"] <= 1.0 for run in new_fractions.values())

    distill = tracking.get_run(cfg.tracking, result.records["distill"].run_id)
    assert json.loads(distill.data.tags[resume.RESUMED_FROM_TAG])["run_id"] == old_distill
    assert [v for _, v in _history(cfg, distill.info.run_id, "resumed_from_epoch")] == [1.0]
    assert 0.0 <= result.records["distill"].metrics["test_top1"] <= 1.0
