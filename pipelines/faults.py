"""Fault injection for tests: the one place a test makes the pipeline fail on purpose, read from the environment
variable ``SSLFLOW_FAULTS`` (a JSON object), never from the pipeline config, never part of a stage fingerprint.

    SSLFLOW_FAULTS='{"pretrain_hold_at_step": 30, "once_dir": "/tmp/faults"}' sslflow run CONFIG

Keys (each optional; an unknown key or a wrong type raises ``ValueError`` naming it):

- ``pretrain_hold_at_step`` (int, 0-based): every Ray Train worker of a pretraining sleeps ``hold_seconds`` (default
  300) after the optimizer step of that number, once per Train run and rank: it first writes the file
  ``<Train run name>.hold.step.rank<N>`` in ``once_dir`` (a LOCAL folder, required with this key), which tells a
  test that the run is parked mid-epoch (to kill its driver or a worker there) and keeps a restarted worker group
  from holding again.
- ``pretrain_hold_at_epoch`` (int, 1-based): the same at the start of that epoch (after the previous epoch's
  checkpoint; marker ``<Train run name>.hold.epoch.rank<N>``), for a test that cannot know the number of steps per
  epoch in advance. With both keys a run holds twice (e.g. a worker killed at the first hold, the driver at the
  second).
- ``pretrain_nan_at_step`` (int, 0-based): the batch of that pretraining step is made NaN (the non-finite guard).
- ``tune_fail_trial`` (int): the Tune trial of that number raises before it trains.

Who reads it: the driver side of each fault (the stage task, the Tune trial) calls ``active()``; Ray Train workers
get the parsed ``Faults`` inside their job (``PretrainJob.faults``), not from their own environment; the DAG passes
the variable to its stage tasks (``runtime_env()``), whose Ray workers may have started before it was set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAULTS_ENV = "SSLFLOW_FAULTS"


@dataclass(frozen=True)
class Faults:
    """The parsed ``SSLFLOW_FAULTS`` (all None: no fault)."""

    pretrain_hold_at_step: int | None = None
    pretrain_hold_at_epoch: int | None = None
    hold_seconds: int = 300
    pretrain_nan_at_step: int | None = None
    tune_fail_trial: int | None = None
    once_dir: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            wanted = str if f.name == "once_dir" else int
            if value is not None and (not isinstance(value, wanted) or isinstance(value, bool)):
                raise ValueError(f"{FAULTS_ENV}: {f.name} must be {wanted.__name__}, got {value!r}")
        for hold in ("pretrain_hold_at_step", "pretrain_hold_at_epoch"):
            if getattr(self, hold) is not None and self.once_dir is None:
                raise ValueError(f"{FAULTS_ENV}: {hold} needs once_dir (a local folder for its markers)")


def parse(text: str | None) -> Faults:
    """``Faults`` from the JSON text of ``SSLFLOW_FAULTS`` (None or empty: no fault)."""
    if not text:
        return Faults()
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{FAULTS_ENV} is not a JSON object: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{FAULTS_ENV} must be a JSON object, got {text!r}")
    known = {f.name for f in dataclasses.fields(Faults)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{FAULTS_ENV}: unknown key {unknown[0]!r}; keys: {', '.join(sorted(known))}")
    return Faults(**values)


def active() -> Faults:
    """The faults this process's environment asks for."""
    return parse(os.environ.get(FAULTS_ENV))


def runtime_env() -> dict[str, Any] | None:
    """A Ray ``runtime_env`` that hands ``SSLFLOW_FAULTS`` to a task and what it starts (None when unset)."""
    text = os.environ.get(FAULTS_ENV)
    return {"env_vars": {FAULTS_ENV: text}} if text else None


def hold_marker(faults: Faults, train_run_name: str, rank: int, kind: str) -> Path:
    """The file a worker of ``rank`` writes when it starts holding: ``kind`` "step" (``pretrain_hold_at_step``) or
    "epoch" (``pretrain_hold_at_epoch``)."""
    return Path(faults.once_dir) / f"{train_run_name}.hold.{kind}.rank{rank}"


def _hold(faults: Faults, train_run_name: str, rank: int, kind: str, where: str) -> None:
    marker = hold_marker(faults, train_run_name, rank, kind)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"holding {where}\n")
    time.sleep(faults.hold_seconds)


def hold_at_step(faults: Faults, train_run_name: str, step: int, rank: int) -> None:
    """``pretrain_hold_at_step``: after that optimizer step (0-based), write ``hold_marker`` and sleep
    ``hold_seconds``, once per Train run and rank."""
    if faults.pretrain_hold_at_step is not None and step == faults.pretrain_hold_at_step:
        _hold(faults, train_run_name, rank, "step", f"after step {step}")


def hold_at_epoch(faults: Faults, train_run_name: str, epoch: int, rank: int) -> None:
    """``pretrain_hold_at_epoch``: at the start of that 1-based epoch (``epoch`` is 0-based, as the loop's
    ``before_epoch`` passes it), as ``hold_at_step``."""
    if faults.pretrain_hold_at_epoch is not None and epoch + 1 == faults.pretrain_hold_at_epoch:
        _hold(faults, train_run_name, rank, "epoch", f"at the start of epoch {epoch + 1}")


def fail_trial(faults: Faults, number: int) -> None:
    """``tune_fail_trial``: raise in the Tune trial of that number."""
    if faults.tune_fail_trial == number:
        raise RuntimeError(f"injected failure in trial {number} ({FAULTS_ENV} tune_fail_trial)")
