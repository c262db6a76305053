"""The report of one pipeline run: a self-contained HTML page (images inline as PNG data URIs, no scripts).

Sections: the stages (status, time, reuse), loss and kNN curves per epoch, the evaluation table (kNN and linear
probe of the SSL encoder against a random one), the label-efficiency table and plot, the embedding map, the
confusion matrix of the distilled student on the test split, the promotion decision and its reason, and the Tune
trials (table and plot) when tune ran. Everything is read back from MLflow (``pipeline_view``), so a report can be
written for any past run (``sslflow report RUN_ID``); ``write_report`` logs it as the artifact
``report/report.html`` of the pipeline run and writes it beside the tracking database.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.config import TrackingConfig
from pipelines.console import format_duration, leaf_name
from pipelines.dag import STAGES

REPORT_ARTIFACT_DIR = "report"
REPORT_FILE = "report.html"


@dataclass(frozen=True)
class StageView:
    """One stage of a pipeline run: its own nested run, or the earlier run it reused."""

    name: str
    run: Any  # mlflow.entities.Run
    reused: bool

    @property
    def record(self) -> dict[str, Any]:
        return json.loads(self.run.data.tags.get(tracking.RECORD_TAG, "{}"))

    @property
    def status(self) -> str:
        return "REUSED" if self.reused else self.run.info.status

    @property
    def seconds(self) -> float | None:
        info = self.run.info
        return None if info.end_time is None else (info.end_time - info.start_time) / 1000


@dataclass(frozen=True)
class PipelineView:
    """A pipeline run as MLflow holds it."""

    run: Any
    stages: dict[str, StageView] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def name(self) -> str:
        return self.run.data.tags.get(tracking.PIPELINE_TAG, "?")

    def param(self, key: str) -> str | None:
        return self.run.data.params.get(key)


def latest_pipeline_run_id(tracking_config: TrackingConfig) -> str:
    runs = tracking.search_runs(tracking_config, f"tags.`{tracking.STAGE_TAG}` = 'pipeline'", max_results=1)
    if not runs:
        raise ValueError(f"no pipeline runs in {tracking_config.uri} (experiment {tracking_config.experiment}): "
                         "run `sslflow run` first, or pass --config for another store")
    return runs[0].info.run_id


def pipeline_view(tracking_config: TrackingConfig, run_id: str) -> PipelineView:
    """The pipeline run ``run_id`` with its stages in DAG order (its nested runs, and the runs named by its
    ``sslflow.reused.<stage>`` tags); a stage run that is not a pipeline's is refused with the parent's id."""
    run = tracking.get_run(tracking_config, run_id)
    kind = run.data.tags.get(tracking.STAGE_TAG)
    if kind != "pipeline":
        parent = run.data.tags.get(tracking.PARENT_TAG)
        hint = f"; its pipeline run is {parent}" if parent else ""
        raise ValueError(f"MLflow run {run_id} is a {kind or 'non-sslflow'} run, not a pipeline run{hint}")
    children = {}
    for child in tracking.search_runs(tracking_config, f"tags.`{tracking.PARENT_TAG}` = '{run_id}'"):
        children.setdefault(child.data.tags.get(tracking.STAGE_TAG), child)  # newest first
    stages = {}
    for name in STAGES:
        if name in children:
            stages[name] = StageView(name, children[name], reused=False)
        elif (reused := run.data.tags.get(tracking.reused_tag(name))) is not None:
            stages[name] = StageView(name, tracking.get_run(tracking_config, reused), reused=True)
    return PipelineView(run, stages)


# ------------------------------------------------------------------------------------------------- figures


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_png(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> str:
    """One panel per metric (``{panel title: {line label: [(epoch, value)]}}``), base64 PNG."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for axis, (title, lines) in zip(axes[0], curves.items()):
        for label, points in lines.items():
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=8)
    return _png(figure)


def confusion_matrix(predicted: list[int], labels: list[int], num_classes: int) -> list[list[int]]:
    """``matrix[true][predicted]`` counts."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for truth, guess in zip(labels, predicted):
        matrix[truth][guess] += 1
    return matrix


def confusion_png(matrix: list[list[int]]) -> str:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(4.8, 4.2))
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("student, test split")
    figure.colorbar(image, ax=axis)
    return _png(figure)


def student_confusion(view: PipelineView, tracking_config: TrackingConfig) -> tuple[list[list[int]], str] | None:
    """The distilled student's confusion matrix on the labeled test rows of the run's ``data.path`` (None, with
    the reason, when the run has no student or the data is gone)."""
    from pipelines.datasets import load_split_tensors
    from ssl_core.evaluate import extract_features

    distill, ingest = view.stages.get("distill"), view.stages.get("ingest")
    data_path, image_size = view.param("data.path"), view.param("data.image_size")
    if distill is None or ingest is None or data_path is None or image_size is None:
        return None
    try:
        images, labels = load_split_tensors(data_path, "test", int(image_size), labeled_only=True)
    except (FileNotFoundError, ValueError) as error:
        raise LookupError(f"the test split at {data_path} cannot be read ({error})") from error
    student = tracking.load_torch_model(tracking_config, distill.record["model_uri"])
    logits = extract_features(student, images, device=__import__("torch").device("cpu"),
                              normalize=student.normalization())
    predicted = logits.argmax(dim=1).tolist()
    matrix = confusion_matrix(predicted, labels.tolist(), int(ingest.record["num_classes"]))
    return matrix, confusion_png(matrix)


def _artifact_png(tracking_config: TrackingConfig, uri: str) -> str:
    with tempfile.TemporaryDirectory() as directory:
        path = tracking.download_artifact(tracking_config, uri, directory)
        return base64.b64encode(path.read_bytes()).decode()


def _artifact_rows(tracking_config: TrackingConfig, uri: str) -> list[dict[str, str]]:
    with tempfile.TemporaryDirectory() as directory:
        path = tracking.download_artifact(tracking_config, uri, directory)
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------------- HTML


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_number(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _image(png_base64: str, alt: str, image_id: str) -> str:
    return f'<img id="{image_id}" alt="{html.escape(alt)}" src="data:image/png;base64,{png_base64}">'


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:first-child{text-align:left}img{max-width:100%;display:block;margin:.5em 0}
.note{color:#666}"""


def render(view: PipelineView, tracking_config: TrackingConfig) -> str:
    """The report's HTML (module docstring)."""
    parts: list[str] = []
    info = view.run.info
    title = f"sslflow pipeline {view.name}: run {view.run_id}"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.start_time / 1000))
    total = None if info.end_time is None else (info.end_time - info.start_time) / 1000
    parts.append(f"<h1>{html.escape(title)}</h1><p>status {info.status}; started {started}; "
                 f"{_duration(total)}; tracking {html.escape(tracking_config.uri)}</p>")

    parts.append("<h2>Stages</h2>")
    parts.append(_table(["stage", "status", "time", "MLflow run"],
                        [[s.name, s.status, _duration(s.seconds), s.run.info.run_id] for s in view.stages.values()],
                        "stages"))

    curves: dict[str, dict[str, list[tuple[int, float]]]] = {"training loss per epoch": {}}
    for stage in view.stages.values():
        runs = [stage.run]
        if stage.name == "finetune":
            runs = tracking.search_runs(tracking_config, f"tags.`{tracking.PARENT_TAG}` = '{stage.run.info.run_id}'")
        for run in runs:
            loss = tracking.metric_history(tracking_config, run.info.run_id, "epoch_loss")
            if loss and stage.name != "tune":
                label = stage.name if run is stage.run else f"{stage.name} {leaf_name(run.info.run_name)}"
                curves["training loss per epoch"][label] = loss
    if "pretrain" in view.stages:
        knn = tracking.metric_history(tracking_config, view.stages["pretrain"].run.info.run_id, "epoch_knn_top1")
        if knn:
            curves["pretrain kNN top-1 (monitor) per epoch"] = {"pretrain": knn}
    if curves["training loss per epoch"]:
        parts.append("<h2>Training curves</h2>" + _image(curves_png(curves), "loss and kNN per epoch", "curves"))

    if "evaluate" in view.stages:
        metrics = view.stages["evaluate"].record.get("metrics", {})
        rows = [[name, metrics[f"{key}_random"], metrics[f"{key}_ssl"]]
                for name, key in (("kNN top-1", "knn_top1"), ("kNN top-5", "knn_top5"),
                                  ("linear probe top-1", "linear_top1")) if f"{key}_ssl" in metrics]
        parts.append("<h2>Evaluation (test split)</h2>" + _table(["metric", "random init", "SSL"], rows, "evaluation"))
        plot_uri = view.stages["evaluate"].record.get("plot_uri")
        if plot_uri:
            parts.append("<h2>Embedding map</h2>"
                         + _image(_artifact_png(tracking_config, plot_uri), "test embeddings (PCA)", "embedding"))

    if "finetune" in view.stages:
        finetune = view.stages["finetune"]
        metrics = finetune.run.data.metrics
        fractions = sorted((float(key.removeprefix("test_top1_fraction_")), value) for key, value in metrics.items()
                           if key.startswith("test_top1_fraction_"))
        parts.append("<h2>Label efficiency</h2>" + _table(
            ["labeled fraction", "fine-tuned teacher test top-1"], [[f"{f:g}", top1] for f, top1 in fractions],
            "label_efficiency"))
        plot_uri = f"runs:/{finetune.run.info.run_id}/plots/label_efficiency.png"
        if any(path == "plots/label_efficiency.png"
               for path, _ in tracking.list_artifacts(tracking_config, finetune.run.info.run_id, "plots")):
            parts.append(_image(_artifact_png(tracking_config, plot_uri), "label efficiency", "label_efficiency_plot"))

    if "distill" in view.stages:
        parts.append("<h2>Student: confusion matrix (test split)</h2>")
        try:
            found = student_confusion(view, tracking_config)
        except LookupError as error:
            found = None
            parts.append(f'<p class="note">{html.escape(str(error))}</p>')
        if found is not None:
            matrix, png = found
            top1 = view.stages["distill"].record.get("metrics", {}).get("test_top1")
            val_top1 = view.stages["distill"].record.get("metrics", {}).get("val_top1")  # what promotion compares
            parts.append(f"<p>student test top-1 {_number(top1)}, val top-1 {_number(val_top1)} (the promotion "
                         "gate)</p>" + _image(png, "confusion matrix", "confusion"))
            parts.append(_table(["true \\ predicted", *map(str, range(len(matrix)))],
                                [[str(i), *row] for i, row in enumerate(matrix)], "confusion_table"))

    if "promote" in view.stages:
        record = view.stages["promote"].record
        parts.append("<h2>Promotion</h2>" + _table(
            ["model", "version", "promoted", "champion version", "reason"],
            [[record.get("model_name"), record.get("version"), "yes" if record.get("promoted") else "no",
              record.get("champion_version"), record.get("reason")]], "promotion"))

    if "tune" in view.stages:
        record = view.stages["tune"].record
        rows = _artifact_rows(tracking_config, record["results_uri"])
        columns = [name for name in (rows[0] if rows else {}) if name not in ("run_id", "trial_id")]
        parts.append(f"<h2>Tune trials ({html.escape(record['metric'])}, {record['mode']}), best first</h2>")
        parts.append(_table(columns, [[_cell(row[c]) for c in columns] for row in rows], "tune_trials"))
        tune_run = view.stages["tune"].run.info.run_id
        for path, _ in tracking.list_artifacts(tracking_config, tune_run, "tune"):
            if path.endswith(".png"):
                parts.append(_image(_artifact_png(tracking_config, f"runs:/{tune_run}/{path}"), path, "tune_plot"))

    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def _cell(value: str) -> Any:
    try:
        return float(value) if "." in value or "e" in value.lower() else value
    except ValueError:
        return value


def report_path(tracking_config: TrackingConfig, view: PipelineView) -> Path:
    """``reports/<pipeline>-<run id>.html`` beside a SQLite database, else under ``./sslflow-reports``."""
    uri = tracking_config.uri
    base = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path("sslflow-reports")
    return (base / "reports" if uri.startswith("sqlite:///") else base).resolve() / f"{view.name}-{view.run_id}.html"


def write_report(tracking_config: TrackingConfig, run_id: str | None = None) -> Path:
    """Write the report of pipeline run ``run_id`` (default: the newest), log it as the run's artifact
    ``report/report.html``, and return where it was written."""
    view = pipeline_view(tracking_config, run_id or latest_pipeline_run_id(tracking_config))
    page = render(view, tracking_config)
    path = report_path(tracking_config, view)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    with tempfile.TemporaryDirectory() as directory:
        copy = Path(directory) / REPORT_FILE
        copy.write_text(page, encoding="utf-8")
        tracking.log_artifact(tracking_config, view.run_id, copy, REPORT_ARTIFACT_DIR)
    return path
