"""Continuing work an earlier pipeline run left unfinished: runs of dead drivers, and training stages that resume
from the Ray Train checkpoints of an earlier attempt.

Dead drivers. Every pipeline run is tagged with its driver (``sslflow.driver``: host, pid and the process's start
time, which tells a reused pid apart). ``close_dead_runs`` ends KILLED each RUNNING pipeline run whose driver on
this host is gone, and every run still RUNNING under it (stage runs, fine-tuning fractions, Tune trials), tagged
with why. A driver on another host cannot be checked from here: its runs are left as they are.

Resume. A training stage's Ray Train run is named after its MLflow run (``train_run_name``), so a new attempt of the
stage starts a new Train run. ``earlier_attempts`` are the runs of the same stage with the same fingerprint that did
not finish (FAILED or KILLED; a RUNNING one belongs to a live driver), newest first; ``resume_point`` looks for the
newest checkpoint under ``storage_path/<their Train run name>`` that loads (``torch.load``): a corrupt or truncated
one is skipped with a warning naming its file, and the previous kept one is tried. The worker loop then starts
from it when its own Train run has no checkpoint yet (``pipelines.train_loop``, ``pipelines.checkpoints``): model (with the method's EMA
teacher, queue and centers), optimizer, epoch and step; schedules and RNG are functions of the step and epoch.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines import storage, tracking
from pipelines.checkpoints import latest_valid_checkpoint
from pipelines.config import PipelineConfig, TrackingConfig

DRIVER_TAG = "sslflow.driver"
"""On a pipeline run: JSON ``{"host", "pid", "started"}`` of the process that drives it."""
KILLED_REASON_TAG = "sslflow.killed_reason"
RESUMED_FROM_TAG = "sslflow.resumed_from"
"""On a stage (or fine-tuning fraction) run: JSON ``{"run_id", "epoch", "checkpoint"}`` it resumed from."""
MAX_EARLIER_ATTEMPTS = 10


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22); None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def driver_identity() -> str:
    """The ``sslflow.driver`` tag value of this process."""
    pid = os.getpid()
    return json.dumps({"host": socket.gethostname(), "pid": pid, "started": _process_start(pid)})


def driver_alive(identity: str) -> bool | None:
    """Whether the driver named by a ``sslflow.driver`` value still runs; None when it cannot be told (another
    host, no ``/proc``, an unreadable value)."""
    try:
        driver = json.loads(identity)
        host, pid, started = driver["host"], int(driver["pid"]), driver["started"]
    except (ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname() or started is None or not Path("/proc").is_dir():
        return None
    return _process_start(pid) == started


def end_running_under(tracking_config: TrackingConfig, run_id: str, status: str, reason: str) -> list[str]:
    """End ``status`` every RUNNING run nested (at any depth) under ``run_id``, tagged with ``reason``; their ids."""
    ended: list[str] = []
    frontier = [run_id]
    while frontier:
        parent = frontier.pop()
        for child in tracking.search_runs(tracking_config, f"tags.`{tracking.PARENT_TAG}` = '{parent}'", 1000):
            frontier.append(child.info.run_id)
            if child.info.status == "RUNNING":
                tracking.set_tags(tracking_config, child.info.run_id, {KILLED_REASON_TAG: reason})
                tracking.end_run(tracking_config, child.info.run_id, status)
                ended.append(child.info.run_id)
    return ended


def close_dead_runs(tracking_config: TrackingConfig, echo: Callable[[str], None] = print) -> list[str]:
    """End KILLED every RUNNING pipeline run whose driver (on this host) is gone, with every RUNNING run under it;
    one line per pipeline run. Returns the ids of the pipeline runs ended."""
    closed = []
    running = tracking.search_runs(tracking_config, f"tags.`{tracking.STAGE_TAG}` = 'pipeline' and "
                                                    "attributes.status = 'RUNNING'", 1000)
    for run in running:
        identity = run.data.tags.get(DRIVER_TAG)
        if identity is None or driver_alive(identity) is not False:
            continue
        driver = json.loads(identity)
        reason = f"its driver (pid {driver['pid']} on {driver['host']}) died"
        stages = end_running_under(tracking_config, run.info.run_id, "KILLED", reason)
        tracking.set_tags(tracking_config, run.info.run_id, {KILLED_REASON_TAG: reason})
        tracking.end_run(tracking_config, run.info.run_id, "KILLED")
        echo(f"pipeline run {run.info.run_id} was left RUNNING ({reason}): ended KILLED with "
             f"{len(stages)} run(s) under it")
        closed.append(run.info.run_id)
    return closed


def earlier_attempts(tracking_config: TrackingConfig, run_id: str) -> list[str]:
    """Ids of the earlier runs of ``run_id``'s stage with its fingerprint that ended FAILED or KILLED, newest
    first (at most ``MAX_EARLIER_ATTEMPTS``)."""
    tags = tracking.get_run(tracking_config, run_id).data.tags
    if tracking.STAGE_TAG not in tags or tracking.FINGERPRINT_TAG not in tags:  # not a DAG stage run
        return []
    runs = tracking.search_runs(
        tracking_config,
        f"tags.`{tracking.STAGE_TAG}` = '{tags[tracking.STAGE_TAG]}' and "
        f"tags.`{tracking.FINGERPRINT_TAG}` = '{tags[tracking.FINGERPRINT_TAG]}' and "
        "attributes.status != 'FINISHED' and attributes.status != 'RUNNING'",
        MAX_EARLIER_ATTEMPTS + 1,
    )
    return [run.info.run_id for run in runs if run.info.run_id != run_id][:MAX_EARLIER_ATTEMPTS]


def nested_attempts(tracking_config: TrackingConfig, parent_run_ids: list[str], stage_tag: str,
                    params: dict[str, str]) -> list[str]:
    """Ids of the runs tagged ``stage_tag`` with ``params`` nested under any of ``parent_run_ids`` and not RUNNING,
    newest first (the fine-tuning fraction runs of earlier attempts of the finetune stage)."""
    found = []
    for parent in parent_run_ids:
        for run in tracking.search_runs(tracking_config, f"tags.`{tracking.PARENT_TAG}` = '{parent}' and "
                                                         f"tags.`{tracking.STAGE_TAG}` = '{stage_tag}'", 1000):
            if run.info.status != "RUNNING" and all(run.data.params.get(k) == v for k, v in params.items()):
                found.append(run)
    return [run.info.run_id for run in sorted(found, key=lambda run: -run.info.start_time)]


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint of an earlier attempt that loads: its run, its folder (path or URI) and where it stopped."""

    run_id: str
    checkpoint: str
    epoch: int
    step: int


def resume_point(cfg: PipelineConfig, train_stage: str, run_id: str, candidates: list[str], what: str,
                 echo: Callable[[str], None] = print) -> ResumePoint | None:
    """The newest loadable checkpoint of the Ray Train runs of ``candidates`` (earlier attempts, newest first; their
    Train runs are ``train_run_name(train_stage, candidate)``), announced as ``<what>: resuming run <id> from epoch
    <n> checkpoint`` and tagged on ``run_id``; None (saying why, when an attempt left checkpoints) to start over."""
    from pipelines.ray_train import train_run_name

    root = storage.locate(cfg.scaling.storage_path)
    unusable = []
    for candidate in candidates:
        train_run = root.child(train_run_name(train_stage, candidate))
        if not storage.list_names(train_run):
            continue
        found = latest_valid_checkpoint(train_run, lambda message: echo(f"{what}: warning: {message}"))
        if found is None:
            unusable.append(candidate)
            continue
        folder, state = found
        point = ResumePoint(candidate, folder, state["epoch"], state["step"])
        echo(f"{what}: resuming run {candidate} from epoch {point.epoch} checkpoint")
        tracking.set_tags(cfg.tracking, run_id, {RESUMED_FROM_TAG: json.dumps(
            {"run_id": candidate, "epoch": point.epoch, "checkpoint": folder})})
        return point
    if unusable:
        echo(f"{what}: starting over: no checkpoint of run(s) {', '.join(unusable)} loads")
    return None
