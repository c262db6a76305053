"""What a person sees in the terminal during ``sslflow run``: one line per stage start and finish, a live progress
bar per running training run, and nothing else; everything Ray and MLflow print goes to a log file.

- ``quiet_terminal(log_path)``: for the block, file descriptors 1 and 2 (and so Python's ``sys.stdout``/``stderr``,
  the logging handlers of Ray and MLflow, warnings, Ray's forwarded worker lines, C++ output) write to
  ``log_path``; it yields a ``Console`` on the real terminal. ``-v`` skips it: everything stays on the terminal.
- ``ProgressMonitor``: a driver thread that polls MLflow (through ``pipelines.tracking``) every ``interval``
  seconds for the pipeline run's stage runs and their nested runs (a fine-tuning fraction, a Tune trial) and turns
  what the training loop logs (``epochs_total`` at start; per epoch ``epochs_done``, ``epoch_loss``,
  ``epoch_images_per_second``, ``epoch_knn_top1``) into progress. It reads what workers already log, so it
  works the same on a cluster and costs the workers nothing.

On a terminal each running run has a tqdm bar; elsewhere (a pipe, CI, a test) each epoch is one line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

EPOCHS_TOTAL = "epochs_total"
"""Metric the training loop logs once at start: the epochs the run will train."""
EPOCHS_DONE = "epochs_done"
"""Metric the training loop logs after each epoch (at step = that epoch): epochs finished."""
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
"""Set (unless already set) before Ray starts when the terminal is quiet: Ray Data's progress bars off (workers
inherit the variable from the local Ray this process starts)."""


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass(frozen=True)
class Progress:
    """One training run's progress as its MLflow metrics tell it."""

    name: str
    """What the line names: ``pretrain``, ``finetune-0.1``, ``tune trial-003``."""
    epochs_done: int
    epochs_total: int
    elapsed_seconds: float
    loss: float | None = None
    images_per_second: float | None = None
    knn_top1: float | None = None

    @property
    def eta_seconds(self) -> float | None:
        """Time left at the mean pace of the epochs done (None before the first epoch)."""
        if self.epochs_done <= 0 or self.epochs_total <= 0:
            return None
        return self.elapsed_seconds / self.epochs_done * max(0, self.epochs_total - self.epochs_done)

    def describe(self) -> str:
        """``loss 4.1234  images/s 210.5  kNN 0.6120  ETA 1 min 10 s`` (parts not yet known left out)."""
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.images_per_second is not None:
            parts.append(f"images/s {self.images_per_second:.1f}")
        if self.knn_top1 is not None:
            parts.append(f"kNN {self.knn_top1:.4f}")
        eta = self.eta_seconds
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return "  ".join(parts)

    def line(self) -> str:
        """``  pretrain  epoch 3/15  loss ...`` (the line printed per epoch where there is no bar)."""
        return f"  {self.name:<9} epoch {self.epochs_done}/{self.epochs_total}  {self.describe()}".rstrip()


def progress_from_metrics(name: str, metrics: dict[str, float], elapsed_seconds: float) -> Progress | None:
    """A run's ``Progress`` from its latest metric values, or None for a run that does not train (no
    ``epochs_total``)."""
    if EPOCHS_TOTAL not in metrics:
        return None
    return Progress(name, int(metrics.get(EPOCHS_DONE, 0)), int(metrics[EPOCHS_TOTAL]), elapsed_seconds,
                    metrics.get("epoch_loss"), metrics.get("epoch_images_per_second"), metrics.get("epoch_knn_top1"))


class Console:
    """Lines for a person, on ``stream`` (the terminal). Lines written while bars are drawn go above them."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.lock = threading.Lock()

    @property
    def is_terminal(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, text: str) -> None:
        with self.lock:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
            self.stream.flush()


def log_file_path(tracking_uri: str, now: float | None = None) -> Path:
    """Where a run's log goes: ``logs/sslflow-<UTC time>.log`` beside a SQLite database, else under ``./sslflow-logs``
    (a tracking server keeps no local folder)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    if tracking_uri.startswith("sqlite:///"):
        base = Path(tracking_uri.removeprefix("sqlite:///")).parent / "logs"
    else:
        base = Path("sslflow-logs")
    return base.resolve() / f"sslflow-{stamp}-{os.getpid()}.log"


@contextmanager
def quiet_terminal(log_path: Path) -> Iterator[Console]:
    """Send file descriptors 1 and 2 to ``log_path`` for the block (so every print, logging handler, Python
    warning, forwarded Ray worker line and C++ message of this process and its children lands there); yield a
    ``Console`` that writes to the terminal. Everything is restored on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
    log = log_path.open("a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each warning once, to sys.stderr: the log
            yield Console(terminal)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        terminal.close()
        log.close()


class ProgressMonitor:
    """A daemon thread that shows the pipeline run's progress (module docstring) until ``stop()``.

    Prints ``  <stage> started`` when a stage run appears, ``  <stage> finished in 42 s`` / ``FAILED`` when it
    ends, and per running training run a bar (terminal) or one line per epoch (otherwise).
    """

    def __init__(self, tracking_config, pipeline_run_id: str, console: Console, interval: float = 2.0) -> None:
        self.tracking, self.parent, self.console, self.interval = tracking_config, pipeline_run_id, console, interval
        self.seen_status: dict[str, str] = {}
        self.shown_epoch: dict[str, int] = {}
        self.bars: dict[str, object] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sslflow-progress", daemon=True)

    def __enter__(self) -> ProgressMonitor:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        try:
            self.poll()  # the last finishes
        finally:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.poll()
            except Exception as error:  # a busy database: try again next time, never break the run
                logging.getLogger(__name__).debug("progress poll failed: %s", error)

    def poll(self) -> None:
        from pipelines import tracking

        now = time.time()
        stages = tracking.search_runs(self.tracking, f"tags.`{tracking.PARENT_TAG}` = '{self.parent}'")
        for stage_run in sorted(stages, key=lambda run: run.info.start_time):
            stage = stage_run.data.tags.get(tracking.STAGE_TAG, stage_run.info.run_name)
            self._status(stage, stage_run)
            if stage_run.info.status != "RUNNING":
                continue
            self._progress(stage, stage_run, now)
            nested = tracking.search_runs(self.tracking, f"tags.`{tracking.PARENT_TAG}` = '{stage_run.info.run_id}'")
            for run in sorted(nested, key=lambda run: run.info.start_time):
                name = f"{stage} {run.info.run_name}" if stage == "tune" else run.info.run_name
                if run.info.status == "RUNNING":
                    self._progress(name, run, now)
                else:
                    self._close_bar(run.info.run_id)

    def _status(self, stage: str, run) -> None:
        run_id, status = run.info.run_id, run.info.status
        before = self.seen_status.get(run_id)
        if before == status:
            return
        self.seen_status[run_id] = status
        if before is None:
            self.console.line(f"  {stage:<9} started")
        if status != "RUNNING":
            self._close_bar(run_id)
            seconds = ((run.info.end_time or time.time() * 1000) - run.info.start_time) / 1000
            verb = "finished" if status == "FINISHED" else status
            self.console.line(f"  {stage:<9} {verb} in {format_duration(seconds)}")

    def _progress(self, name: str, run, now: float) -> None:
        progress = progress_from_metrics(name, run.data.metrics, now - run.info.start_time / 1000)
        if progress is None:
            return
        run_id = run.info.run_id
        if not self.console.is_terminal:
            if self.shown_epoch.get(run_id, 0) < progress.epochs_done:
                self.shown_epoch[run_id] = progress.epochs_done
                self.console.line(progress.line())
            return
        from tqdm import tqdm

        bar = self.bars.get(run_id)
        if bar is None:
            bar = tqdm(total=progress.epochs_total, desc=f"  {name:<9}", unit="epoch", file=self.console.stream,
                       position=len(self.bars), leave=False, dynamic_ncols=True,
                       bar_format="{desc} {bar:20} epoch {n_fmt}/{total_fmt}  {postfix}")
            self.bars[run_id] = bar
        bar.n = progress.epochs_done
        bar.set_postfix_str(progress.describe(), refresh=False)
        bar.refresh()

    def _close_bar(self, run_id: str) -> None:
        bar = self.bars.pop(run_id, None)
        if bar is not None:
            bar.close()
