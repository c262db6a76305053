"""Where a Ray Train run's fixed start-up goes, on a local Ray, timed from the driver:

- read: for ``materialized``, ``read_split(materialize=True)`` in the driver (read tasks decode the rows once, into
  the object store), before ``fit``; 0 for the others;
- fit -> worker spawned: the controller actor, the placement group, the worker actor's process
  (``psutil.Process().create_time()`` of rank 0);
- spawned -> train function: the worker's imports and the torch process group;
- first batch: from the worker's first ``iter_torch_batches`` call to its first batch (Ray Data's DatasetManager and
  SplitCoordinator actors, then the epoch's execution: read/decode tasks for ``streaming``, block fetches for
  ``materialized``); then ``epoch 1`` and ``epoch 2``: each epoch's whole pass over its shard (batch 64);
- function end -> fit returns: the controller noticing the end and tearing down.

``--data none`` is a train function that does nothing; ``streaming`` and ``materialized`` read the 1293 training
digits (``builtin:digits``, ingested once) at ``--image-size`` through ``pipelines.datasets.read_split``, as the
training stages do (``streaming``: per epoch from the shards; ``materialized``: decoded once per run).

    python benchmarks/train_startup.py [--workers 1 2] [--data none streaming materialized] [--rounds 2]

Rounds interleave the variants; each line also prints the load average, as the split moves with load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EPOCHS, BATCH = 2, 64


def worker_marks(config: dict) -> None:
    """Every rank reads its shard (a streaming split waits for all of them); rank 0 writes its marks."""
    import psutil
    import ray.train

    marks = {"spawned": psutil.Process().create_time(), "started": time.time(), "epochs": []}
    if config["data"]:
        shard = ray.train.get_dataset_shard("train")
        for _ in range(EPOCHS):
            began, first = time.time(), None
            for _batch in shard.iter_torch_batches(batch_size=BATCH, drop_last=True):
                first = first or time.time()
            marks["epochs"].append((first - began, time.time() - began))
    marks["ended"] = time.time()
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["file"]).write_text(json.dumps(marks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data", nargs="+", choices=("none", "streaming", "materialized"),
                        default=["none", "streaming", "materialized"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.datasets import read_split
    from pipelines.ray_train import init_ray
    from pipelines.stages.ingest import ingest

    init_ray(num_cpus=args.cpus, include_dashboard=True, log_to_driver=False)
    with tempfile.TemporaryDirectory() as directory:
        digits = Path(directory) / "digits"
        if set(args.data) - {"none"}:
            ingest("builtin:digits", digits, seed=0)
        for round_index in range(args.rounds):
            for data in args.data:
                for workers in args.workers:
                    marks_file = Path(directory) / f"marks-{round_index}-{data}-{workers}.json"
                    called = time.time()
                    datasets = {} if data == "none" else {"train": read_split(
                        digits, "train", image_size=args.image_size, materialize=data == "materialized")}
                    fit_called = time.time()
                    TorchTrainer(worker_marks, train_loop_config={"file": str(marks_file), "data": data != "none"},
                                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                                 run_config=RunConfig(name=f"startup-{round_index}-{data}-{workers}",
                                                      storage_path=str(Path(directory) / "runs")),
                                 datasets=datasets).fit()
                    returned = time.time()
                    marks = json.loads(marks_file.read_text())
                    epochs = "".join(f", epoch {i + 1} {total:.1f} s (first batch {first:.1f})"
                                     for i, (first, total) in enumerate(marks["epochs"]))
                    print(f"{data:<12} workers={workers}: read {fit_called - called:.1f} s, fit->worker spawned "
                          f"{marks['spawned'] - fit_called:.1f} s, spawned->train function "
                          f"{marks['started'] - marks['spawned']:.1f} s{epochs}, function->fit returns "
                          f"{returned - marks['ended']:.1f} s, total {returned - called:.1f} s "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
