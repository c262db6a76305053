"""Ingest throughput: files/s of ``sslflow ingest`` over a folder of real image files, threads vs Ray tasks, for
1 and all cores.

The folder is generated once from the real Tiny-ImageNet images of ``../shared/datasets`` (the 10,000 validation
and 10,000 unlabeled test images at 32x32, written as JPEG files, flat: 20,000 files by default; ``--size`` upscales
them bilinearly to make each decode heavier). Each variant ingests the whole folder into a fresh output; variants
are interleaved over ``--rounds`` rounds and each figure is reported with its spread (min..max over rounds).

Variants: ``threads-N`` (``executor="threads"``, N loader threads in one process) and ``ray-N`` (``executor="ray"``,
one Ray task per chunk of ``--shard-rows`` files on a local Ray started with ``num_cpus=N``).

    flock /tmp/sslflow-bench.lock python benchmarks/ingest.py --work-dir /tmp/ingest_bench

Shared machines: say so next to the figures; other work on the cores lowers them and widens the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
FILES = ("tiny32_val.npz", "tiny32_test_unlabeled.npz")


def write_folder(folder: Path, count: int, size: int, datasets: Path) -> Path:
    """``count`` real images as JPEG files (quality 90) in ``folder`` (reused when it already holds them)."""
    marker = folder / f".complete-{count}-{size}"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    images = np.concatenate([np.load(datasets / name)["x"] for name in FILES])
    if count > len(images):
        raise ValueError(f"--count {count} is more than the {len(images)} images of {', '.join(FILES)}")
    for index in range(count):
        image = Image.fromarray(images[index])
        if size != image.width:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        image.save(folder / f"{index:06d}.jpg", quality=90)
    marker.touch()
    return folder


def run_variant(variant: str, folder: Path, out: Path, shard_rows: int) -> float:
    """Seconds to ingest ``folder`` with ``variant`` (``threads-N`` or ``ray-N``)."""
    from pipelines.stages.ingest import ingest

    executor, cores = variant.split("-")
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    manifest = ingest(str(folder), out, val_fraction=0.0, shard_rows=shard_rows, executor=executor,
                      workers=int(cores))
    seconds = time.perf_counter() - started
    assert manifest["num_rows"] + manifest["corrupt_count"] > 0
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/sslflow_ingest_bench"))
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--shard-rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cores", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = parser.parse_args()

    import ray

    folder = write_folder(args.work_dir / f"images_{args.count}_{args.size}", args.count, args.size, args.datasets)
    variants = [f"{executor}-{cores}" for cores in args.cores for executor in ("threads", "ray")]
    seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
        for variant in variants:
            cores = int(variant.split("-")[1])
            if variant.startswith("ray"):
                ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
            try:
                seconds[variant].append(run_variant(variant, folder, args.work_dir / "out", args.shard_rows))
            finally:
                if variant.startswith("ray"):
                    ray.shutdown()
            rate = args.count / seconds[variant][-1]
            print(f"round {round_index}: {variant:<10} {seconds[variant][-1]:7.1f} s  {rate:7.0f} files/s", flush=True)
    summary = {}
    for variant, values in seconds.items():
        rates = [args.count / value for value in values]
        summary[variant] = {"files_per_s_median": statistics.median(rates), "min": min(rates), "max": max(rates),
                            "seconds": values}
        print(f"{variant:<10} median {statistics.median(rates):7.0f} files/s  (min {min(rates):.0f}, "
              f"max {max(rates):.0f}; {len(rates)} rounds)")
    (args.work_dir / "ingest_bench.json").write_text(json.dumps(
        {"count": args.count, "size": args.size, "shard_rows": args.shard_rows, "cpu_count": os.cpu_count(),
         "results": summary}, indent=2))


if __name__ == "__main__":
    main()
