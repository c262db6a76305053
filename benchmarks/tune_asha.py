"""Wall time of the same Ray Tune search with ASHA early stopping and without a scheduler.

Both searches draw the same trials (seeded random search over the SimCLR temperature) on the built-in digits,
each trial a short pretraining scored by kNN top-1 per epoch, through the real tune stage (Ray Tune + Ray Train +
Ray Data + MLflow). Prints one row per scheduler and a machine-readable last line, e.g.
``tune 8 trials x 3 epochs cpu2: asha=95s none=180s speedup=1.89 best_asha=0.91 best_none=0.92``.

    python benchmarks/tune_asha.py [--trials 8] [--epochs 4] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402


def search(scheduler: str, args: argparse.Namespace, workdir: Path):
    """The tune stage's ``TuneRecord`` of one search."""
    from pipelines import tracking
    from pipelines.config import config_from_mapping
    from pipelines.datasets import MANIFEST_NAME
    from pipelines.stages import tune
    from pipelines.stages.ingest import ingest

    data = workdir / "digits"
    if not (data / MANIFEST_NAME).is_file():
        ingest("builtin:digits", data)
    root = workdir / scheduler
    shutil.rmtree(root, ignore_errors=True)
    cfg = config_from_mapping({
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "mlartifacts")},
        "data": {"path": str(data), "image_size": 16},
        "method": {"name": "simclr", "config": {"backbone": args.backbone, "projection_hidden_dim": 64,
                                                "projection_dim": 32}},
        "scaling": {"storage_path": str(root / "runs")},
        "pretrain": {"batch_size": 128, "optimizer": "adamw", "lr": 0.004, "lr_scaling": "none",
                     "warmup_epochs": 1, "log_every_steps": 5},
        "tune": {"enabled": True, "num_samples": args.trials, "epochs": args.epochs, "scheduler": scheduler,
                 "grace_period": 1, "reduction_factor": 2, "cpus_per_worker": args.cpus_per_worker, "seed": 0,
                 "bounds": {"temperature": {"loguniform": [0.02, 2.0]}}},
    })
    tracking.ensure_experiment(cfg.tracking)
    with tracking.run(cfg.tracking, f"tune-{scheduler}", {tracking.STAGE_TAG: "tune"}) as run_id:
        return tune.run(cfg, run_id, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--backbone", default="resnet8")
    parser.add_argument("--workdir", default=str(REPO / "bench_runs" / "tune_asha"))
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from pipelines.ray_train import init_ray

    init_ray(num_cpus=args.cpus, include_dashboard=True, log_to_driver=False)  # as the CLI: workers at nice 0
    workdir = Path(args.workdir)
    results = {scheduler: search(scheduler, args, workdir) for scheduler in ("asha", "none")}
    print(f"\n{args.trials} trials x {args.epochs} epochs, SimCLR {args.backbone} on digits 16px, "
          f"{args.cpus} CPUs, workers of {args.cpus_per_worker} CPU")
    print(f"{'scheduler':<10} {'wall s':>8} {'completed':>10} {'stopped':>8} {'errored':>8} {'best knn_top1':>14}")
    for scheduler, record in results.items():
        trials = record.trials
        print(f"{scheduler:<10} {record.search_seconds:>8.1f} {trials['completed']:>10} "
              f"{trials['stopped_early']:>8} {trials['errored']:>8} {record.best_value:>14.4f}")
    asha, none = results["asha"], results["none"]
    print(f"tune {args.trials} trials x {args.epochs} epochs cpu{args.cpus}: asha={asha.search_seconds:.0f}s "
          f"none={none.search_seconds:.0f}s speedup={none.search_seconds / asha.search_seconds:.2f} "
          f"best_asha={asha.best_value:.4f} best_none={none.best_value:.4f}")


if __name__ == "__main__":
    main()
