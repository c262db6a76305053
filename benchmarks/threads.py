"""Torch threads per Ray Train worker: pretraining images/s through the real pretrain path (Parquet -> Ray Data
readers -> on-device views -> step) for each (backbone, image size) x (CPUs reserved per worker, torch threads).

    python benchmarks/threads.py [--rounds 2] [--images 2048] [--batch-size 64] [--cases resnet20:16 resnet18:32]
                                 [--variants 1.0:1 1.0:2 1.5:1 1.5:2]

A variant ``C:T`` reserves ``scaling.cpus_per_worker = C`` for the one worker and runs ``scaling.torch_threads = T``
intra-op threads in it; whatever the worker leaves of Ray's CPUs goes to the Ray Data read/decode tasks
(``pipelines.datasets.READ_CPUS`` each) and Ray's own processes. Every run pretrains SimCLR for 2 epochs of
``--images`` real 32x32 images (Tiny-ImageNet test set of ../shared/datasets, resized by the readers to the
case's size); the figure is the second epoch's images/s (the first pays start-up). The variants are interleaved
round by round (a shared machine drifts), and the table gives each one's median over the rounds with the min-max
spread. Ray is started as the CLI starts it (workers at nice 0), with the machine's CPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, REPO, ingest_images, method_settings, start_ray  # noqa: E402


def images_per_second(backbone: str, image_size: int, cpus_per_worker: float, threads: int, images: int,
                      batch_size: int, work_dir: Path) -> float:
    """Second-epoch images/s of a 2-epoch SimCLR pretraining with one worker (nothing logged to MLflow)."""
    from pipelines.config import config_from_mapping
    from pipelines.pretraining import fit_pretraining

    data_path = ingest_images(images, work_dir, DATASETS)
    settings = {k: v for k, v in method_settings("simclr", backbone, image_size).items() if k != "image_size"}
    config = config_from_mapping({
        "data": {"path": str(data_path), "image_size": image_size},
        "method": {"name": "simclr", "config": settings},
        "scaling": {"num_workers": 1, "cpus_per_worker": cpus_per_worker, "torch_threads": threads,
                    "storage_path": str(work_dir / "runs")},
        "pretrain": {"epochs": 2, "batch_size": batch_size, "optimizer": "adamw", "lr": 1e-3, "lr_scaling": "none",
                     "warmup_epochs": 0.5, "knn_every": 1000},
    }, base=work_dir)
    name = f"threads-{backbone}-{image_size}px-{cpus_per_worker}cpu-{threads}t-{os.getpid()}-{time.time_ns()}"
    result = fit_pretraining(config, None, name, log_model=False)
    return float(result.return_value["metrics"]["images_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["resnet20:16", "resnet18:32"], help="BACKBONE:IMAGE_SIZE")
    parser.add_argument("--variants", nargs="+", default=["1.0:1", "1.0:2", "1.5:1", "1.5:2"],
                        help="CPUS_PER_WORKER:TORCH_THREADS")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=2048, help="train images (per epoch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench_runs" / "threads")
    args = parser.parse_args()

    import ray
    import torch

    cpus = os.cpu_count() or 2
    cases = [(backbone, int(size)) for backbone, size in (case.split(":") for case in args.cases)]
    variants = [(float(c), int(t)) for c, t in (variant.split(":") for variant in args.variants)]
    start_ray(cpus, 0)
    niceness = ray.get(ray.remote(num_cpus=0.1)(lambda: os.nice(0)).remote())
    print(f"Ray worker niceness: {niceness} (RAY_worker_niceness={os.environ.get('RAY_worker_niceness')})", flush=True)
    started = time.perf_counter()
    rates: dict[tuple[str, int, float, int], list[float]] = {}
    for round_index in range(args.rounds):
        for backbone, size in cases:
            for cpus_per_worker, threads in variants:
                rate = images_per_second(backbone, size, cpus_per_worker, threads, args.images, args.batch_size,
                                         args.work_dir)
                rates.setdefault((backbone, size, cpus_per_worker, threads), []).append(rate)
                print(f"round {round_index + 1}: {backbone} {size}px cpus_per_worker {cpus_per_worker} "
                      f"threads {threads}: {rate:.1f} images/s", flush=True)
    ray.shutdown()
    print(f"\nSimCLR, batch {args.batch_size}, 1 worker, {args.images} images/epoch, {args.rounds} interleaved rounds, "
          f"cpu, {cpus} CPUs for Ray, Ray workers at nice {niceness}, torch {torch.__version__}, "
          f"ray {ray.__version__}, "
          f"{time.perf_counter() - started:.0f} s, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"| {'backbone':<9}| {'px':>3} | {'cpus_per_worker':>15} | {'threads':>7} | {'images/s median':>15} | "
          f"{'min-max':>13} |")
    print(f"|{'-' * 10}|{'-' * 5}|{'-' * 17}|{'-' * 9}|{'-' * 17}|{'-' * 15}|")
    for (backbone, size, cpus_per_worker, threads), values in rates.items():
        spread = f"{min(values):.0f}-{max(values):.0f}"
        print(f"| {backbone:<9}| {size:>3} | {cpus_per_worker:>15} | {threads:>7} | "
              f"{statistics.median(values):>15.1f} | {spread:>13} |")


if __name__ == "__main__":
    main()
