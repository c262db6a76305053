"""Fine-tuning stage (SimCLRv2): the pretrained encoder plus the first ``finetune.head_layers`` blocks of its
projection head (``SSLMethod.finetune_head``), under a new linear classifier, trained on a class-balanced labeled
fraction of the train split, once per fraction of ``finetune.fractions`` (label efficiency in one stage).

Per fraction, the driver picks the labeled subset (``labeled_subset_ids``; seeded and nested across fractions),
opens an MLflow run nested under the stage's run and streams exactly those rows through Ray Data; each Ray Train
worker downloads the pretrain checkpoint from MLflow and builds the classifier. With ``finetune.semi.algorithm:
none`` it trains with cross-entropy on the labeled rows only; otherwise every worker also holds an unlabeled pool
(all train rows, at most ``semi.unlabeled_rows``: the fraction's labeled rows plus a seeded subset of the others,
split between the workers) and runs ``ssl_core.semi.SemiObjective``. Rank 0 logs the test-split top-1 and the
classifier as the MLflow model ``classifier`` in the fraction's run. The worker's parts (job, classifier,
objective) live in ``pipelines.finetuning``, shared with the tune stage's fine-tune trials (``tune.finetune``),
whose best ``finetune.semi`` overlay reaches this stage through the DAG.

The stage's run gets ``test_top1_fraction_<f>`` per fraction, ``test_top1`` of ``finetune.label_fraction``, and
``plots/label_efficiency.png``: test top-1 against the labeled fraction, with the evaluate stage's linear probe and
kNN on the frozen SSL features (all train labels) as references.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from pipelines import resume, supervised, tracking
from pipelines.config import PipelineConfig, from_dict
from pipelines.datasets import IF_FITS, labeled_subset_ids, read_manifest, read_split
from pipelines.finetuning import FinetuneJob, fine_tune
from pipelines.ray_train import fit, train_run_name
from pipelines.records import EvaluateRecord, FinetuneRecord, PretrainRecord, StageRecord, fraction_key
from pipelines.train_loop import worker_info

FRACTION_STAGE_TAG = "finetune_fraction"
"""``sslflow.stage`` of a fraction's run nested under the stage's run."""


def train_func(values: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker. Returns (on rank 0) ``{"model_uri", "metrics"}``."""
    job = from_dict(FinetuneJob, values)
    cfg, f = job.config, job.config.finetune
    info = worker_info(cfg.scaling.cpus_per_worker, cfg.scaling.torch_threads, "finetune")
    model = fine_tune(job, info)
    if not info.is_chief:
        return None
    [top1] = supervised.test_top1(cfg, info.device, model)
    results = {"test_top1": top1, "label_fraction": job.label_fraction, "num_labeled": job.num_labeled}
    print(f"[finetune] fraction {job.label_fraction:g} ({f.semi.algorithm}): test top-1 {top1:.4f} "
          f"({job.num_labeled} labeled rows)", flush=True)
    return supervised.finish(cfg, job.run_id, model, "classifier", results, f.epochs)


def _finetune_fraction(cfg: PipelineConfig, run_id: str, pretrain: PretrainRecord, fraction: float,
                       num_classes: int, earlier: list[str]) -> dict[str, Any]:
    """One fraction in its own MLflow run nested under the stage's ``run_id``; ``{"model_uri", "metrics"}``. It starts
    from this fraction's newest loadable checkpoint in the ``earlier`` (FAILED/KILLED) attempts of the stage, if any."""
    labeled_ids = labeled_subset_ids(cfg.data.path, "train", fraction, cfg.data.seed)
    tags = {tracking.STAGE_TAG: FRACTION_STAGE_TAG, tracking.PIPELINE_TAG: cfg.name}
    params = {"label_fraction": fraction, "num_labeled": len(labeled_ids),
              "semi": dataclasses.asdict(cfg.finetune.semi)}
    mlflow_name = tracking.nested_run_name(cfg.name, "finetune", fraction_key(fraction))
    with tracking.run(cfg.tracking, mlflow_name, tags, run_id, params) as fraction_run_id:
        candidates = resume.nested_attempts(cfg.tracking, earlier, FRACTION_STAGE_TAG,
                                            {"label_fraction": str(fraction)})
        point = resume.resume_point(cfg, "finetune", fraction_run_id, candidates, f"finetune fraction {fraction:g}")
        job = FinetuneJob(cfg, fraction_run_id, num_classes, len(labeled_ids), fraction, pretrain.checkpoint_uri,
                          None if point is None else point.checkpoint)
        dataset = read_split(cfg.data.path, "train", image_size=cfg.data.image_size, labeled_only=True,
                             labeled_ids=labeled_ids,  # decoded once, not once per epoch
                             materialize=IF_FITS)
        run_name = train_run_name("finetune", fraction_run_id)
        result = fit(train_func, dataclasses.asdict(job), cfg.scaling, run_name, {"train": dataset})
        if result.return_value is None:
            raise RuntimeError(f"finetune run {run_name} returned no record from rank 0")
        return result.return_value


def label_efficiency_plot(top1: dict[float, float], references: dict[str, float], path: Path,
                          title: str) -> None:
    """Test top-1 against the labeled fraction (log x axis), with each reference as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted(top1)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    axis.plot(fractions, [top1[f] for f in fractions], marker="o", label="fine-tuned teacher")
    for (name, value), style in zip(references.items(), ("--", ":", "-.")):
        axis.axhline(value, linestyle=style, color="grey", label=f"{name} ({value:.3f})")
    axis.set_xscale("log")
    axis.set_xticks(fractions, [f"{f:g}" for f in fractions])
    axis.set_xlabel("labeled fraction of the train split")
    axis.set_ylabel("test top-1")
    axis.set_title(title)
    axis.legend(loc="lower right")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> FinetuneRecord:
    """Fine-tune the pretrain checkpoint on each of ``finetune.fractions`` (see the module docstring); metrics
    ``test_top1``, ``label_fraction``, ``num_labeled`` (of ``finetune.label_fraction``) and
    ``test_top1_fraction_<f>`` per fraction."""
    pretrain: PretrainRecord = inputs["pretrain"]
    supervised.check_test_split(cfg.data.path)
    num_classes = read_manifest(cfg.data.path)["num_classes"]
    earlier = resume.earlier_attempts(cfg.tracking, run_id)  # their fraction runs' checkpoints resume each fraction
    results = {fraction: _finetune_fraction(cfg, run_id, pretrain, fraction, num_classes, earlier)
               for fraction in cfg.finetune.fractions}
    per_fraction = {f"test_top1_fraction_{fraction_key(f)}": r["metrics"]["test_top1"] for f, r in results.items()}
    primary = results[cfg.finetune.label_fraction]
    metrics = {**primary["metrics"], **per_fraction}
    tracking.log_metrics(cfg.tracking, run_id, [(0, metrics)])
    evaluate: EvaluateRecord | None = inputs.get("evaluate")
    references = {} if evaluate is None else {
        "linear probe, SSL features, all labels": evaluate.metrics["linear_top1_ssl"],
        "kNN, SSL features, all labels": evaluate.metrics["knn_top1_ssl"]}
    with tempfile.TemporaryDirectory() as directory:
        plot = Path(directory) / "label_efficiency.png"
        label_efficiency_plot({f: r["metrics"]["test_top1"] for f, r in results.items()}, references, plot,
                              f"{cfg.method.name}, fine-tuning with semi: {cfg.finetune.semi.algorithm}")
        tracking.log_artifact(cfg.tracking, run_id, plot, "plots")
    return FinetuneRecord(num_classes=num_classes, model_uri=primary["model_uri"], metrics=metrics,
                          teachers={fraction_key(f): r["model_uri"] for f, r in results.items()})
