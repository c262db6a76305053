"""The console: progress lines and their numbers, the rank-0 step progress, the Tune trials table, the redrawn block
on a terminal, the quiet terminal (Ray's and MLflow's output to a log file), the progress monitor on a real MLflow
store, the hints that end user errors, run names in the shared pipeline run, and the terminal output of a real
`sslflow run` that reuses every stage."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipelines import tracking
from pipelines.config import config_from_mapping
from pipelines.console import (EPOCHS_DONE, EPOCHS_TOTAL, PROGRESS_IMAGES_PER_SECOND, PROGRESS_LOSS, PROGRESS_STEP,
                               PROGRESS_STEPS_PER_SECOND, STEPS_PER_EPOCH, Console, Progress, ProgressMonitor,
                               StepProgress, TrialRow, format_duration, progress_from_metrics, trial_table_lines)
from pipelines.stages.tune import trial_state_callback

REPO = Path(__file__).resolve().parents[1]


def test_durations_read_as_a_person_says_them() -> None:
    assert format_duration(0.4) == "0 s"
    assert format_duration(42) == "42 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(3720) == "1 h 02 min"


def test_progress_line_has_epoch_loss_throughput_knn_and_eta_at_the_mean_pace() -> None:
    progress = Progress("pretrain", epochs_done=3, epochs_total=10, elapsed_seconds=30.0, loss=1.23456,
                        images_per_second=210.04, knn_top1=0.61234)
    assert progress.eta_seconds == 70.0  # no step pace logged: 10 s per epoch done, 7 epochs left
    assert progress.line() == "  pretrain  epoch 3/10  loss 1.2346  images/s 210.0  kNN 0.6123  ETA 1 min 10 s"
    assert Progress("distill", 0, 4, 12.0).eta_seconds is None
    assert Progress("distill", 0, 4, 12.0).line() == "  distill   epoch 0/4"


def test_live_line_shows_the_epoch_in_progress_steps_and_eta_from_the_step_pace() -> None:
    progress = Progress("finetune 0.1", epochs_done=1, epochs_total=4, elapsed_seconds=99.0, loss=0.5,
                        images_per_second=64.0, step=15, steps_per_epoch=10, steps_per_second=2.5)
    assert progress.steps_total == 40 and progress.eta_seconds == 10.0  # 25 steps left at 2.5 steps/s
    assert progress.live_line() == ("  finetune 0.1  [########------------] epoch 2/4  step 15/40  loss 0.5000  "
                                    "images/s 64.0  ETA 10 s")  # 15/40 of 20 characters: 7.5 -> 8
    done = Progress("distill", 2, 2, 5.0, step=20, steps_per_epoch=10, steps_per_second=4.0)
    assert done.live_line() == f"  distill       [{'#' * 20}] epoch 2/2  step 20/20  ETA 0 s"


def test_progress_is_read_from_the_metrics_the_training_loop_logs() -> None:
    metrics = {EPOCHS_TOTAL: 15.0, EPOCHS_DONE: 5.0, "epoch_loss": 2.0, "epoch_images_per_second": 99.0}
    progress = progress_from_metrics("pretrain", metrics, 50.0)
    assert (progress.epochs_done, progress.epochs_total, progress.loss, progress.knn_top1) == (5, 15, 2.0, None)
    assert progress.eta_seconds == 100.0
    assert progress_from_metrics("evaluate", {"knn_top1_ssl": 0.9}, 3.0) is None  # a stage that does not train
    # Mid-epoch, the step row is newer than the last epoch's: its running loss and images/s, its step and pace.
    stepping = {**metrics, STEPS_PER_EPOCH: 10.0, PROGRESS_STEP: 57.0, PROGRESS_LOSS: 1.5,
                PROGRESS_IMAGES_PER_SECOND: 120.0, PROGRESS_STEPS_PER_SECOND: 3.0}
    progress = progress_from_metrics("pretrain", stepping, 50.0)
    assert (progress.step, progress.loss, progress.images_per_second) == (57, 1.5, 120.0)
    assert progress.eta_seconds == pytest.approx((150 - 57) / 3.0)
    # Once the epoch that row was in has finished, the epoch's numbers win and the step is the epoch's end.
    progress = progress_from_metrics("pretrain", {**stepping, EPOCHS_DONE: 6.0}, 50.0)
    assert (progress.step, progress.loss, progress.images_per_second) == (60, 2.0, 99.0)


def test_step_progress_logs_at_most_once_per_interval_with_the_epochs_running_numbers() -> None:
    pace = StepProgress(started=1000.0, interval=10.0)
    assert not pace.due(1008.0, step=101)  # the end of the first step (start-up included): the pace starts here
    first = pace.row(1008.0, step=101, epoch_steps=1, epoch_seconds=8.0, images_per_step=64, epoch_loss_sum=3.0)
    assert PROGRESS_STEPS_PER_SECOND not in first  # no step has followed the first: no pace yet
    assert not pace.due(1017.9, step=140) and pace.due(1018.0, step=150)  # 10 s after the last row
    row = pace.row(1018.0, step=151, epoch_steps=20, epoch_seconds=4.0, images_per_step=64, epoch_loss_sum=30.0)
    assert row == {PROGRESS_STEP: 151, PROGRESS_LOSS: 1.5, PROGRESS_IMAGES_PER_SECOND: 320.0,
                   PROGRESS_STEPS_PER_SECOND: 5.0}  # 20 x 64 images in 4 s; 50 steps in the 10 s after step 101
    assert not pace.due(1027.0, step=160) and pace.due(1028.5, step=170)


def test_trials_table_aligns_the_searched_values_status_epoch_and_knn() -> None:
    rows = [TrialRow("trial-000", "completed", {"method.config.temperature": "0.123456", "pretrain.lr": "0.3"}, 2, 2,
                     0.61),
            TrialRow("trial-001", "running", {"method.config.temperature": "0.05", "pretrain.lr": "1e-05"}, 1, 2),
            TrialRow("trial-002", "running", {"method.config.temperature": "0.2", "pretrain.lr": "0.1"})]
    assert trial_table_lines(rows) == [
        "    trial      status     temperature  lr     epoch  kNN",
        "    trial-000  completed  0.1235       0.3    2/2    0.6100",
        "    trial-001  running    0.05         1e-05  1/2    -",
        "    trial-002  running    0.2          0.1    -      -",
    ]
    clash = [TrialRow("trial-000", "running",
                      {"pretrain.lr": "0.1", "finetune.lr": "0.2", "method.config.queue_size": "128"})]
    assert trial_table_lines(clash)[0].split() == ["trial", "status", "finetune.lr", "queue_size", "pretrain.lr",
                                                   "epoch", "kNN"]
    assert rows[0].line() == "  tune      trial-000 completed  temperature=0.1235  lr=0.3  epoch 2/2  kNN 0.6100"
    # The fine-tuning search scores its trials on the val split: its column and line say so.
    assert trial_table_lines(rows, "tune_finetune")[0].split()[-2:] == ["val", "top-1"]
    assert rows[0].line("tune_finetune").endswith("epoch 2/2  val top-1 0.6100")


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal, of a size it cannot tell (the console then assumes 120 x 40)."""

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation


def screen(written: str) -> list[str]:
    """What a terminal shows after ``written``: lines, with ESC[nF (up n lines, to column 0) and ESC[J (erase to the
    end of the screen) applied, as a naive cursor walk."""
    lines, row, index = [""], 0, 0
    while index < len(written):
        up = re.match(r"\x1b\[(\d+)F", written[index:])
        if up:
            row, index = max(0, row - int(up.group(1))), index + len(up.group(0))
        elif written.startswith("\x1b[J", index):
            del lines[row + 1:]
            lines[row], index = "", index + 3
        elif written[index] == "\n":
            row, index = row + 1, index + 1
            if row == len(lines):
                lines.append("")
        else:
            lines[row] += written[index]
            index += 1
    return lines[:-1] if lines[-1] == "" else lines


def test_console_redraws_the_live_block_below_the_printed_lines() -> None:
    terminal = FakeTerminal()
    console = Console(terminal)
    console.size = lambda: (30, 6)
    console.line("  pretrain  started")
    console.show(["bar one", "bar two " + "x" * 40])
    console.line("  ingest    finished in 3 s")
    console.show(["bar one, later"])
    assert screen(terminal.getvalue()) == ["  pretrain  started", "  ingest    finished in 3 s", "bar one, later"]
    console.show([f"row {i}" for i in range(9)])  # taller than the terminal: the rest is counted
    assert screen(terminal.getvalue())[2:] == ["row 0", "row 1", "row 2", "    ... and 6 more"]
    console.show([])
    assert screen(terminal.getvalue()) == ["  pretrain  started", "  ingest    finished in 3 s"]
    console.show(["bar two " + "x" * 40])
    assert screen(terminal.getvalue())[-1] == ("bar two " + "x" * 40)[:29]  # cut to the width: a wrap breaks redraws
    piped = io.StringIO()
    Console(piped).show(["a bar"])  # nothing is redrawn off a terminal
    assert piped.getvalue() == ""


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


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """A config whose MLflow store (created once for the module) the monitor tests share, each under its own
    pipeline run."""
    tmp_path = tmp_path_factory.mktemp("store")
    return config_from_mapping({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db",
                                             "artifact_location": str(tmp_path / "artifacts")}}, base=tmp_path)


def test_monitor_prints_stage_start_epochs_and_finish_from_mlflow(cfg) -> None:
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


def test_monitor_shows_tune_trials_as_a_table_and_nested_runs_by_their_last_name(cfg) -> None:
    """Trial runs nested in a running tune stage: a table on a terminal, a line per ended trial elsewhere (the
    tune stage's Tune callback tags a trial's state when it ends); a fine-tuning fraction's run is named by the last
    component of its run name, whatever the pipeline's name."""
    pipeline = "team/a"  # a slash in the pipeline's name
    parent = tracking.start_run(cfg.tracking, tracking.stage_run_name(pipeline, "pipeline"),
                                {tracking.STAGE_TAG: "pipeline"})
    tune = tracking.start_run(cfg.tracking, tracking.stage_run_name(pipeline, "tune"), {tracking.STAGE_TAG: "tune"},
                              parent)
    tracking.log_params(cfg.tracking, tune, {"tune": {"num_samples": 3}})
    trials = []
    for number, temperature in enumerate((0.1, 0.25)):
        run_id = tracking.start_run(cfg.tracking, tracking.nested_run_name(pipeline, "tune", f"trial-{number:03d}"),
                                    {tracking.STAGE_TAG: "tune_trial", tracking.TRIAL_TAG: f"{tune}_{number:05d}"},
                                    tune)
        tracking.log_params(cfg.tracking, run_id, {"method": {"config": {"temperature": temperature}}})
        tracking.log_metrics(cfg.tracking, run_id, [(0, {EPOCHS_TOTAL: 2}), (1, {EPOCHS_DONE: 1,
                                                                                "epoch_knn_top1": 0.5 + number / 10})])
        trials.append(run_id)
    tune_cfg = cfg.with_overlay({"tune": {"epochs": 2}})
    stopped = SimpleNamespace(trial_id=f"{tune}_00000", last_result={"training_iteration": 1})
    trial_state_callback(tune_cfg).on_trial_complete(iteration=3, trials=[stopped], trial=stopped)
    terminal, piped = FakeTerminal(), io.StringIO()
    for stream in (terminal, piped):
        ProgressMonitor(cfg.tracking, parent, Console(stream)).poll()
    assert screen(terminal.getvalue()) == [
        "  tune      started",
        "  tune      2 of 3 trials started",
        "    trial      status         temperature  epoch  kNN",
        "    trial-000  stopped early  0.1          1/2    0.5000",
        "    trial-001  running        0.25         1/2    0.6000",
    ]
    assert piped.getvalue().splitlines() == [
        "  tune      started", "  tune      trial-000 stopped early  temperature=0.1  epoch 1/2  kNN 0.5000"]
    record = {"best_trial": f"{tune}_00001", "metric": "knn_top1", "best_value": 0.6,
              "trials": {"completed": 1, "stopped_early": 1, "errored": 0}}
    tracking.set_tags(cfg.tracking, tune, {tracking.RECORD_TAG: json.dumps(record)})
    tracking.end_run(cfg.tracking, tune)
    monitor = ProgressMonitor(cfg.tracking, parent, Console(io.StringIO()))
    monitor.poll()
    finished = monitor.console.stream.getvalue().splitlines()[1]
    assert re.fullmatch(rf"  tune      finished in \d+ s: best trial {tune}_00001 knn_top1 0\.6000 "
                        r"\(1 completed, 1 stopped early, 0 errored\)", finished)

    finetune = tracking.start_run(cfg.tracking, tracking.stage_run_name(pipeline, "finetune"),
                                  {tracking.STAGE_TAG: "finetune"}, parent)
    fraction = tracking.start_run(cfg.tracking, tracking.nested_run_name(pipeline, "finetune", "0.1"), {}, finetune)
    tracking.log_metrics(cfg.tracking, fraction, [(0, {EPOCHS_TOTAL: 4, STEPS_PER_EPOCH: 10}),
                                                  (1, {EPOCHS_DONE: 1, "epoch_loss": 0.9}),
                                                  (15, {PROGRESS_STEP: 15, PROGRESS_LOSS: 0.75})])
    terminal = FakeTerminal()
    ProgressMonitor(cfg.tracking, parent, Console(terminal)).poll()
    assert re.fullmatch(r"  finetune 0\.1  \[#{8}-{12}\] epoch 2/4  step 15/40  loss 0\.7500  ETA \d+ s",
                        screen(terminal.getvalue())[-1])


def test_a_known_user_error_ends_with_its_own_hint_else_with_its_types(cfg) -> None:
    from pipelines.cli import what_to_do
    from pipelines.dag import stages_for

    def message_of(call) -> ValueError:
        with pytest.raises(ValueError) as raised:
            call()
        return raised.value

    assert what_to_do(message_of(lambda: tracking.get_run(cfg.tracking, "0123456789abcdef"))).startswith(
        "`sslflow ls` lists the pipeline runs")
    assert what_to_do(message_of(lambda: config_from_mapping({"pretrain": {"lr": 200.0}}))).startswith(
        "set it inside the range given above")
    assert what_to_do(message_of(lambda: config_from_mapping({"method": {"name": "no_such_method"}}))).startswith(
        "set method.name to one of the known methods")
    assert what_to_do(message_of(lambda: stages_for(cfg, until="no_such_stage"))).startswith(
        "use one of the stages listed above")
    assert what_to_do(ValueError("a message no hint knows")).startswith("fix the value named above")
    assert what_to_do(FileExistsError("out")).startswith("choose another output path")


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
    for chatter in ("WARNING", "Warning", "(pid=", "INFO", "Traceback", "tqdm", "\x1b"):  # no colour codes in a pipe
        assert chatter not in output, (chatter, output)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()


@pytest.mark.slow  # inspects the shared pipeline run
def test_stage_and_nested_runs_are_named_by_pipeline_and_stage(quickstart_run) -> None:
    """In the MLflow UI a run says its pipeline and stage: ``<pipeline>/<stage>``, and a fine-tuning fraction's run
    ``<pipeline>/finetune/<fraction>``."""
    cfg, records = quickstart_run.cfg, quickstart_run.result.records
    for stage, record in records.items():
        assert tracking.get_run(cfg.tracking, record.run_id).info.run_name == f"{cfg.name}/{stage}"
    fractions = tracking.search_runs(cfg.tracking, f"tags.`{tracking.PARENT_TAG}` = '{records['finetune'].run_id}'")
    assert sorted(run.info.run_name for run in fractions) == [f"{cfg.name}/finetune/0.05", f"{cfg.name}/finetune/0.1"]
