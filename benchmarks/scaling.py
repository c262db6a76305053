"""Pretraining throughput through the full Ray Train path (Parquet -> Ray Data -> on-device views -> DDP step)
for 1, 2, ... workers on this machine; efficiency = throughput(N) / (N x throughput(1)).

    python benchmarks/scaling.py [--workers 1 2] [--method simclr] [--backbone resnet18] [--images 1024]
                                 [--batch-size 64] [--image-size 32]

Data: the first --images real 32x32 images of ../shared/datasets/tiny32_test_unlabeled.npz. Each worker count
runs 2 epochs of ``--images // (batch x workers)`` steps; the reported images/s is the second epoch's (the first
includes start-up), measured as variant b of ``throughput.py`` (same code: ``common.ray_path_images_per_second``).
On CPU the machine's CPUs, less 0.5 CPU left for the Ray Data readers, are split evenly between the workers; with
CUDA each worker gets one GPU and one CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DATASETS,
    REPO,
    RayPathRun,
    default_cpus_per_worker,
    ray_path_images_per_second,
    start_ray,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench_runs" / "scaling")
    args = parser.parse_args()

    import ray
    import torch

    cuda = torch.cuda.is_available()
    cpus = os.cpu_count() or 2
    start_ray(cpus, torch.cuda.device_count() if cuda else 0)
    results: dict[int, float] = {}
    for workers in args.workers:
        steps = args.images // (args.batch_size * workers)
        if steps == 0:
            raise SystemExit(f"--images {args.images} is less than one batch of {args.batch_size} x {workers} workers")
        run = RayPathRun(args.method, args.backbone, args.image_size, args.batch_size, steps_per_epoch=steps,
                         workers=workers, use_gpu=cuda,
                         cpus_per_worker=1.0 if cuda else default_cpus_per_worker(cpus, workers))
        results[workers] = ray_path_images_per_second(run, args.work_dir, args.datasets)
        print(f"{workers} worker(s): {results[workers]:.1f} images/s", flush=True)
    ray.shutdown()
    base = results[args.workers[0]] / args.workers[0]
    device = torch.cuda.get_device_name() if cuda else f"cpu, {cpus} CPUs"
    print(f"\n{args.method} {args.backbone} {args.image_size}px, batch {args.batch_size}/worker, {device}, "
          f"torch {torch.__version__}, ray {ray.__version__}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'workers':>8}{'images/s':>10}{'efficiency':>12}")
    for workers, rate in results.items():
        print(f"{workers:>8}{rate:>10.1f}{rate / (workers * base):>12.2f}")


if __name__ == "__main__":
    main()
