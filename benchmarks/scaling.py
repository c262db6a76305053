"""Pretraining throughput through the full Ray Train path (Parquet -> Ray Data -> on-device views -> DDP step)
for 1, 2, ... workers on this machine; efficiency = throughput(N) / (N x throughput(1)).

    python benchmarks/scaling.py [--workers 1 2] [--backbone resnet18] [--images 1024] [--batch-size 64]

Data: the first --images real 32x32 images of ../shared/datasets/tiny32_test_unlabeled.npz. Each worker count
runs 2 epochs; the reported images/s is the second epoch's (the first includes start-up). The CPUs of the
machine, less 0.5 CPU left for the Ray Data readers, are split evenly between the workers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench_runs" / "scaling")
    args = parser.parse_args()

    import ray
    import torch

    from pipelines.config import config_from_mapping
    from pipelines.stages.ingest import MANIFEST_NAME, ingest
    from pipelines.stages.pretrain import run_pretrain

    args.work_dir.mkdir(parents=True, exist_ok=True)
    data_path = args.work_dir / f"tiny32_{args.images}"
    if not (data_path / MANIFEST_NAME).is_file():
        images = np.load(args.datasets / "tiny32_test_unlabeled.npz")["x"][: args.images]
        with tempfile.TemporaryDirectory() as directory:
            npz = Path(directory) / "tiny32.npz"
            np.savez(npz, x=images)
            ingest(str(npz), data_path, val_fraction=0.0)
    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    results: dict[int, float] = {}
    for workers in args.workers:
        config = config_from_mapping({
            "data": {"path": str(data_path), "image_size": 32},
            "method": {"name": args.method, "config": {"backbone": args.backbone}},
            "scaling": {"num_workers": workers, "cpus_per_worker": (cpus - 0.5) / workers,
                        "storage_path": str(args.work_dir / "runs")},
            "pretrain": {"epochs": 2, "batch_size": args.batch_size, "optimizer": "lars", "lr": 0.3,
                         "warmup_epochs": 0.5},
        }, base=args.work_dir)
        record = run_pretrain(config, None, f"scaling-{args.method}-{args.backbone}-{workers}w-{os.getpid()}")
        results[workers] = record["metrics"]["images_per_second"]
        print(f"{workers} worker(s): {results[workers]:.1f} images/s", flush=True)
    ray.shutdown()
    base = results[args.workers[0]] / args.workers[0]
    print(f"\n{args.method} {args.backbone} 32px, batch {args.batch_size}/worker, {cpus} CPUs, torch {torch.__version__}, "
          f"ray {ray.__version__}")
    print(f"{'workers':>8}{'images/s':>10}{'efficiency':>12}")
    for workers, rate in results.items():
        print(f"{workers:>8}{rate:>10.1f}{rate / (workers * base):>12.2f}")


if __name__ == "__main__":
    main()
