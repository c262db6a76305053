"""What a person sees in the terminal during ``sslflow run`` (and ``tune``, ``pretrain``): one line per stage start
and finish, a live progress line per running training run, the Tune trials as a table that updates, and nothing else;
everything Ray and MLflow print goes to a log file.

- ``quiet_terminal(log_path)``: for the block, file descriptors 1 and 2 (and so Python's ``sys.stdout``/``stderr``,
  the logging handlers of Ray and MLflow, warnings, Ray's forwarded worker lines, C++ output) write to
  ``log_path``; it yields a ``Console`` on the real terminal. ``-v`` skips it: everything stays on the terminal.
- ``ProgressMonitor``: a driver thread that polls MLflow (through ``pipelines.tracking``) every ``interval``
  seconds for the pipeline run's stage runs and their nested runs (a fine-tuning fraction, a Tune trial) and turns
  what the training loop logs into progress: ``epochs_total`` and ``steps_per_epoch`` at start; per epoch
  ``epochs_done``, ``epoch_loss``, ``epoch_images_per_second``, ``epoch_knn_top1``; and within an epoch, at most
  every ``PROGRESS_INTERVAL_SECONDS``, the ``progress_*`` row of ``StepProgress`` (step, running loss, images/s,
  steps/s). It reads what workers log anyway, so it works the same on a cluster and costs the workers one small
  MLflow write per interval from rank 0, whatever the step rate (no per-step metric, no actor to keep alive).

On a terminal the running runs are a block of lines redrawn in place (``Console.show``) below the stage lines;
elsewhere (a pipe, CI, a test) each finished epoch and each finished Tune trial is one line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

EPOCHS_TOTAL = "epochs_total"
"""Metric the training loop logs once at start: the epochs the run will train."""
EPOCHS_DONE = "epochs_done"
"""Metric the training loop logs after each epoch (at step = that epoch): epochs finished."""
STEPS_PER_EPOCH = "steps_per_epoch"
"""Metric the training loop logs once at start: optimizer steps per epoch."""
PROGRESS_STEP = "progress_step"
"""Within an epoch (``StepProgress``): optimizer steps done since the run began (the row's MLflow step too)."""
PROGRESS_LOSS = "progress_loss"
"""Within an epoch: mean training loss of the epoch's steps so far."""
PROGRESS_IMAGES_PER_SECOND = "progress_images_per_second"
"""Within an epoch: images per second of all workers since the epoch began."""
PROGRESS_STEPS_PER_SECOND = "progress_steps_per_second"
"""Steps per second since this attempt of the loop began (epoch-end work included): the pace of the ETA."""
PROGRESS_INTERVAL_SECONDS = 10.0
"""Rank 0 logs the ``progress_*`` row at most this often: one MLflow write per interval however fast the steps."""
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
"""Set (unless already set) before Ray starts when the terminal is quiet: Ray Data's progress bars off (workers
inherit the variable from the local Ray this process starts)."""
BAR_WIDTH = 20
SEARCH_SCORES: dict[str, tuple[str, str]] = {"tune": ("kNN", "epoch_knn_top1"),
                                             "tune_finetune": ("val top-1", "epoch_val_top1")}
"""Per search stage: the trials table's score column and the per-epoch metric its trials' training loop logs."""


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
    """What the line names: ``pretrain``, ``finetune 0.1``."""
    epochs_done: int
    epochs_total: int
    elapsed_seconds: float
    loss: float | None = None
    images_per_second: float | None = None
    knn_top1: float | None = None
    step: int = 0
    """Optimizer steps done (0 when the run logs no step progress)."""
    steps_per_epoch: int = 0
    steps_per_second: float | None = None

    @property
    def steps_total(self) -> int:
        return self.steps_per_epoch * self.epochs_total

    @property
    def fraction_done(self) -> float:
        """Steps done over steps total when known, else epochs done over epochs total."""
        if self.steps_total > 0:
            return min(1.0, self.step / self.steps_total)
        return min(1.0, self.epochs_done / self.epochs_total) if self.epochs_total > 0 else 0.0

    @property
    def epoch_in_progress(self) -> int:
        """The epoch being trained, 1-based (``epochs_total`` once all are done)."""
        return min(self.epochs_total, self.epochs_done + 1)

    @property
    def eta_seconds(self) -> float | None:
        """Time left: steps left / ``steps_per_second`` when the loop logged its pace, else at the mean pace of the
        epochs done (None before either is known)."""
        if self.steps_per_second and self.steps_total > 0:
            return max(0, self.steps_total - self.step) / self.steps_per_second
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
        """``  pretrain  epoch 3/15  loss ...`` (the line printed per finished epoch where nothing is redrawn)."""
        return f"  {self.name:<9} epoch {self.epochs_done}/{self.epochs_total}  {self.describe()}".rstrip()

    def live_line(self) -> str:
        """``  pretrain      [######--------------] epoch 3/15  step 130/450  loss ...`` (the redrawn line of a
        running run: the epoch in progress, the steps done of all epochs)."""
        filled = round(self.fraction_done * BAR_WIDTH)
        steps = f"  step {self.step}/{self.steps_total}" if self.steps_total > 0 else ""
        return (f"  {self.name:<13} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] "
                f"epoch {self.epoch_in_progress}/{self.epochs_total}{steps}  {self.describe()}").rstrip()


def progress_from_metrics(name: str, metrics: Mapping[str, float], elapsed_seconds: float) -> Progress | None:
    """A run's ``Progress`` from its latest metric values, or None for a run that does not train (no
    ``epochs_total``). Loss and images/s are the running values of the epoch in progress when its
    ``progress_step`` lies past the last finished epoch, else those of the last finished epoch."""
    if EPOCHS_TOTAL not in metrics:
        return None
    epochs_done = int(metrics.get(EPOCHS_DONE, 0))
    steps_per_epoch = int(metrics.get(STEPS_PER_EPOCH, 0))
    logged_step = int(metrics.get(PROGRESS_STEP, 0))
    mid_epoch = logged_step > epochs_done * steps_per_epoch
    loss = metrics.get(PROGRESS_LOSS) if mid_epoch else metrics.get("epoch_loss")
    images_per_second = metrics.get(PROGRESS_IMAGES_PER_SECOND if mid_epoch else "epoch_images_per_second")
    return Progress(name, epochs_done, int(metrics[EPOCHS_TOTAL]), elapsed_seconds, loss, images_per_second,
                    metrics.get("epoch_knn_top1"), step=max(logged_step, epochs_done * steps_per_epoch),
                    steps_per_epoch=steps_per_epoch, steps_per_second=metrics.get(PROGRESS_STEPS_PER_SECOND))


class StepProgress:
    """Rank 0's progress within an epoch, for the driver's console: ``due(now, step)`` (called after every step) says
    whether ``interval`` seconds have passed since the last row (or since ``started``), ``row(...)`` is the row to
    log then. Clock values are ``time.perf_counter()`` seconds.

    - ``progress_step`` = ``step`` (steps done since the run began);
    - ``progress_loss`` = ``epoch_loss_sum / epoch_steps``;
    - ``progress_images_per_second`` = ``epoch_steps * images_per_step / epoch_seconds``;
    - ``progress_steps_per_second`` = ``(step - first_step) / (now - first_time)``, this attempt's pace from the end
      of its first step (``due``'s first call), so the start-up (workers, data pipeline, first batch) is left out;
      absent until a step has followed that one.
    """

    def __init__(self, started: float, interval: float = PROGRESS_INTERVAL_SECONDS) -> None:
        self.interval, self.last_row = interval, started
        self.first: tuple[int, float] | None = None

    def due(self, now: float, step: int) -> bool:
        if self.first is None:
            self.first = (step, now)
        return now - self.last_row >= self.interval

    def row(self, now: float, step: int, epoch_steps: int, epoch_seconds: float, images_per_step: int,
            epoch_loss_sum: float) -> dict[str, float]:
        self.last_row = now
        values = {
            PROGRESS_STEP: step,
            PROGRESS_LOSS: epoch_loss_sum / max(1, epoch_steps),
            PROGRESS_IMAGES_PER_SECOND: epoch_steps * images_per_step / max(epoch_seconds, 1e-9),
        }
        first_step, first_time = self.first if self.first is not None else (step, now)
        if step > first_step and now > first_time:
            values[PROGRESS_STEPS_PER_SECOND] = (step - first_step) / (now - first_time)
        return values


@dataclass(frozen=True)
class TrialRow:
    """One Tune trial as its MLflow run tells it."""

    name: str
    """The last component of its run name: ``trial-003``."""
    status: str
    """``running``, or the state the tune stage gave it: ``completed``, ``stopped early``, ``errored``."""
    values: dict[str, str] = field(default_factory=dict)
    """Searched parameter (``method.config.temperature``) -> the value this trial tries."""
    epochs_done: int = 0
    epochs_total: int = 0
    score: float | None = None
    """The search's metric at the last epoch (``SEARCH_SCORES``)."""

    def line(self, stage: str = "tune") -> str:
        """``  tune      trial-003 completed  temperature=0.2  epoch 2/2  kNN 0.6100`` (printed once it ends,
        where nothing is redrawn)."""
        short = _short_names(sorted(self.values))
        values = "".join(f"  {short[name]}={_value(self.values[name])}" for name in sorted(self.values))
        score = "" if self.score is None else f"  {SEARCH_SCORES[stage][0]} {self.score:.4f}"
        return f"  {stage:<9} {self.name} {self.status}{values}  epoch {self.epochs_done}/{self.epochs_total}{score}"


def _short_names(names: list[str]) -> dict[str, str]:
    """Each parameter's last dotted component (``temperature``), unless two share it (then the full name)."""
    leaves = [name.rsplit(".", 1)[-1] for name in names]
    return {name: leaf if leaves.count(leaf) == 1 else name for name, leaf in zip(names, leaves)}


def _value(text: str) -> str:
    """A searched value as a person reads it: floats with 4 significant digits, anything else as logged."""
    try:
        return f"{float(text):.4g}" if any(mark in text for mark in ".eE") else text
    except ValueError:
        return text


def trial_table_lines(rows: list[TrialRow], stage: str = "tune") -> list[str]:
    """The trials as aligned lines, header first: trial, status, each searched value, epoch, the search's score
    (``SEARCH_SCORES``; ``-`` where not yet known)."""
    names = sorted({name for row in rows for name in row.values})
    short = _short_names(names)
    table = [["trial", "status", *(short[name] for name in names), "epoch", SEARCH_SCORES[stage][0]]]
    for row in rows:
        epoch = f"{row.epochs_done}/{row.epochs_total}" if row.epochs_total else "-"
        score = "-" if row.score is None else f"{row.score:.4f}"
        table.append([row.name, row.status, *(_value(row.values.get(name, "-")) for name in names), epoch, score])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return ["    " + "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]


class Console:
    """Lines for a person, on ``stream`` (the terminal). On a terminal, ``show(lines)`` keeps a block of lines at
    the bottom that each call redraws in place (cursor up, erase, rewrite); ``line(text)`` prints above it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.lock = threading.Lock()
        self.live: list[str] = []

    @property
    def is_terminal(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def size(self) -> tuple[int, int]:
        """(columns, rows) of the terminal, (120, 40) when it cannot tell."""
        try:
            size = os.get_terminal_size(self.stream.fileno())
            return size.columns, size.lines
        except (AttributeError, OSError, ValueError):
            return 120, 40

    def _erase_live(self) -> None:
        if self.live:
            self.stream.write(f"\x1b[{len(self.live)}F\x1b[J")  # to the block's first line, erase to the end

    def _draw_live(self) -> None:
        for text in self.live:
            self.stream.write(text + "\n")

    def line(self, text: str) -> None:
        with self.lock:
            self._erase_live()
            self.stream.write(text + "\n")
            self._draw_live()
            self.stream.flush()

    def show(self, lines: list[str]) -> None:
        """Replace the live block by ``lines``, each cut to the terminal's width (a wrapped line would break the
        redraw), at most the terminal's height less two (the rest counted in a last line). Nothing off a terminal."""
        if not self.is_terminal:
            return
        columns, rows = self.size()
        room = max(1, rows - 2)
        if len(lines) > room:
            lines = [*lines[:room - 1], f"    ... and {len(lines) - room + 1} more"]
        with self.lock:
            self._erase_live()
            self.live = [text[:columns - 1] for text in lines]
            self._draw_live()
            self.stream.flush()


ERROR_HINTS: tuple[tuple[str, str], ...] = (
    (r"^no MLflow run ", "`sslflow ls` lists the pipeline runs of this store; pass --config CONFIG for another store"),
    (r", not a pipeline run", "pass the id of the pipeline run (named above, or listed by `sslflow ls`)"),
    (r"^no pipeline runs in ", "run `sslflow run` first, or pass --config CONFIG naming the store that holds the runs"),
    (r"^unknown stage ", "use one of the stages listed above (`sslflow run CONFIG --dry-run` shows the plan)"),
    (r"^method\.name=.* is unknown", "set method.name to one of the known methods listed above"),
    (r" is out of range ", "set it inside the range given above, in the config file or on the command line"),
    (r": not valid YAML: ", "fix the YAML where the message points (indentation, a missing colon or quote)"),
    (r"^ingest source .*(holds no images|every image is corrupt)",
     "point the source at a folder of PNG/JPEG images or a supported file (`sslflow ingest --help` lists them)"),
)
"""``(regular expression on a user error's message, what to do)``: the specific hint for a known message, tried
before the hint for its error type (``pipelines.cli.what_to_do``)."""


def hint_for(message: str) -> str | None:
    """What to do about the user error ``message``: the first ``ERROR_HINTS`` entry that matches it, else None."""
    return next((hint for pattern, hint in ERROR_HINTS if re.search(pattern, message)), None)


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
    ends; keeps on a terminal one redrawn line per running training run and the Tune trials table; elsewhere prints
    one line per finished epoch and per finished Tune trial. With ``root_name`` the watched run itself trains
    (``sslflow pretrain``) and its progress is shown under that name.
    """

    def __init__(self, tracking_config, pipeline_run_id: str, console: Console, interval: float = 2.0,
                 root_name: str | None = None) -> None:
        self.tracking, self.parent, self.console, self.interval = tracking_config, pipeline_run_id, console, interval
        self.root_name = root_name
        self.seen_status: dict[str, str] = {}
        self.shown_epoch: dict[str, int] = {}
        self.shown_trials: set[str] = set()
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
            self.console.show([])

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.poll()
            except Exception as error:  # a busy database: try again next time, never break the run
                logging.getLogger(__name__).debug("progress poll failed: %s", error)

    def poll(self) -> None:
        from pipelines import tracking

        now = time.time()
        live: list[str] = []
        if self.root_name is not None:
            self._progress(self.root_name, tracking.get_run(self.tracking, self.parent), now, live)
        stages = tracking.search_runs(self.tracking, f"tags.`{tracking.PARENT_TAG}` = '{self.parent}'")
        for stage_run in sorted(stages, key=lambda run: run.info.start_time):
            stage = stage_run.data.tags.get(tracking.STAGE_TAG, stage_run.info.run_name)
            self._status(stage, stage_run)
            if stage_run.info.status != "RUNNING":
                continue
            nested = tracking.search_runs(self.tracking, f"tags.`{tracking.PARENT_TAG}` = '{stage_run.info.run_id}'")
            nested = sorted(nested, key=lambda run: run.info.start_time)
            if stage in SEARCH_SCORES:
                live.extend(self._trials(stage, stage_run, nested))
                continue
            self._progress(stage, stage_run, now, live)
            for run in nested:
                if run.info.status == "RUNNING":
                    self._progress(f"{stage} {leaf_name(run.info.run_name)}", run, now, live)
        self.console.show(live)

    def _status(self, stage: str, run) -> None:
        run_id, status = run.info.run_id, run.info.status
        before = self.seen_status.get(run_id)
        if before == status:
            return
        self.seen_status[run_id] = status
        if before is None:
            self.console.line(f"  {stage:<9} started")
        if status != "RUNNING":
            seconds = ((run.info.end_time or time.time() * 1000) - run.info.start_time) / 1000
            verb = "finished" if status == "FINISHED" else status
            self.console.line(f"  {stage:<9} {verb} in {format_duration(seconds)}{search_outcome(stage, run)}")

    def _progress(self, name: str, run, now: float, live: list[str]) -> None:
        progress = progress_from_metrics(name, run.data.metrics, now - run.info.start_time / 1000)
        if progress is None:
            return
        if self.console.is_terminal:
            live.append(progress.live_line())
        elif self.shown_epoch.get(run.info.run_id, 0) < progress.epochs_done:
            self.shown_epoch[run.info.run_id] = progress.epochs_done
            self.console.line(progress.line())

    def _trials(self, stage: str, stage_run, trial_runs: list) -> list[str]:
        """The trials table (terminal) or a line per newly finished trial (elsewhere); returns the live lines."""
        rows = [trial_row(run, SEARCH_SCORES[stage][1]) for run in trial_runs]
        searched = stage_run.data.params.get("tune.num_samples")
        heading = f"  {stage:<9} {len(rows)}{f' of {searched}' if searched else ''} trials started"
        if self.console.is_terminal:
            return [heading, *trial_table_lines(rows, stage)] if rows else [heading]
        for run, row in zip(trial_runs, rows):
            if row.status != "running" and run.info.run_id not in self.shown_trials:
                self.shown_trials.add(run.info.run_id)
                self.console.line(row.line(stage))
        return []


def search_outcome(stage: str, run) -> str:
    """For a finished search stage, what the trials table showed in a line: ``: best trial 3f2a1_00002 knn_top1
    0.6100 (2 completed, 1 stopped early, 0 errored)``; empty for any other stage or a search with no record."""
    from pipelines import tracking

    record = json.loads(run.data.tags.get(tracking.RECORD_TAG, "{}")) if stage in SEARCH_SCORES else {}
    if "best_trial" not in record:
        return ""
    counts = ", ".join(f"{count} {state.replace('_', ' ')}" for state, count in record["trials"].items())
    return f": best trial {record['best_trial']} {record['metric']} {record['best_value']:.4f} ({counts})"


def leaf_name(run_name: str) -> str:
    """The last path component of a nested run's name (``quickstart/finetune/0.1`` -> ``0.1``): what distinguishes
    it within its stage, whatever slashes the pipeline's name holds."""
    return run_name.rsplit("/", 1)[-1]


def trial_row(run, score_metric: str = "epoch_knn_top1") -> TrialRow:
    """A Tune trial's row from its MLflow run: the state tag the tune stage sets when the trial ends (else
    ``running``), its params (the searched values), its epochs and the last value of ``score_metric``."""
    from pipelines import tracking

    state = run.data.tags.get(tracking.TRIAL_STATE_TAG)
    status = state.replace("_", " ") if state else "running" if run.info.status == "RUNNING" else \
        run.info.status.lower()
    metrics = run.data.metrics
    return TrialRow(leaf_name(run.info.run_name), status, dict(run.data.params), int(metrics.get(EPOCHS_DONE, 0)),
                    int(metrics.get(EPOCHS_TOTAL, 0)), metrics.get(score_metric))
