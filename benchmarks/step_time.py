"""CPU (or GPU) time of one training step (views + forward + backward + optimizer + EMA/queue update) per method.

    python benchmarks/step_time.py [--batch-size 64] [--image-size 32] [--backbone resnet18] [--steps 5]

The step is the pipeline's (``ssl_core.training.TrainStep`` of ``ssl_objective``: on-device views, channels_last,
bf16 autocast on CUDA, LARS), on random uint8 images already on the device. MAE needs a ViT, so it runs with
vit_tiny whatever --backbone says; MoCo's queue and DINO's output have 4096 entries, DINO keeps its default local
crops. Prints a table and the torch version/device.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Case, backbone_for, build_model, device_synchronize, method_settings  # noqa: E402

from ssl_core import available_methods  # noqa: E402
from ssl_core.training import ssl_objective  # noqa: E402


def step_seconds(name: str, backbone: str, batch_size: int, image_size: int, steps: int, device: torch.device) -> float:
    case = Case(name, backbone_for(name, backbone), image_size, batch_size)
    m = build_model(case, device, settings=method_settings(name, backbone, image_size, num_local_crops=None))
    train_step = m.train_step(ssl_objective(m.method.view_generator(), device), steps + 1)
    batch = {"image": torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, device=device)}
    generator = torch.Generator().manual_seed(0)
    timings = []
    for step in range(steps + 1):
        device_synchronize(device)
        started = time.perf_counter()
        train_step(batch, step, generator)
        device_synchronize(device)
        timings.append(time.perf_counter() - started)
    return sorted(timings[1:])[len(timings[1:]) // 2]  # median, first step (warm-up) excluded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=available_methods())
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, {args.image_size}x{args.image_size}")
    print(f"{'method':<14}{'backbone':<11}{'s/step':>8}{'images/s':>10}")
    for name in args.methods:
        seconds = step_seconds(name, args.backbone, args.batch_size, args.image_size, args.steps, device)
        print(f"{name:<14}{backbone_for(name, args.backbone):<11}{seconds:>8.3f}{args.batch_size / seconds:>10.1f}",
              flush=True)


if __name__ == "__main__":
    main()
