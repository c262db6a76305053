"""Where a Ray Train run's fixed start-up goes: a train function that does nothing, on a local Ray, timed in three
parts from the driver's ``fit()`` call:

- fit -> worker spawned: the controller actor, the placement group, the worker actor's process
  (``psutil.Process().create_time()`` of rank 0);
- spawned -> train function: the worker's imports and the torch process group;
- function end -> fit returns: the controller noticing the end and tearing down.

    python benchmarks/train_startup.py [--workers 1 2] [--rounds 2]

Rounds interleave the worker counts; each line also prints the load average, as the split moves with load.
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


def rank0_marks(config: dict) -> None:
    import psutil
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        marks = {"spawned": psutil.Process().create_time(), "started": time.time()}
        Path(config["file"]).write_text(json.dumps(marks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_train import init_ray

    init_ray(num_cpus=args.cpus, include_dashboard=True, log_to_driver=False)
    with tempfile.TemporaryDirectory() as directory:
        for round_index in range(args.rounds):
            for workers in args.workers:
                marks_file = Path(directory) / f"marks-{round_index}-{workers}.json"
                called = time.time()
                TorchTrainer(rank0_marks, train_loop_config={"file": str(marks_file)},
                             scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                             run_config=RunConfig(name=f"startup-{round_index}-{workers}",
                                                  storage_path=str(Path(directory) / "runs"))).fit()
                returned = time.time()
                marks = json.loads(marks_file.read_text())
                print(f"workers={workers}: fit->worker spawned {marks['spawned'] - called:.1f} s, "
                      f"spawned->train function {marks['started'] - marks['spawned']:.1f} s, "
                      f"function->fit returns {returned - marks['started']:.1f} s, total {returned - called:.1f} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
