"""CPU (or GPU) time of one training step (views + forward + backward + optimizer + EMA/queue update) per method.

    python benchmarks/step_time.py [--batch-size 64] [--image-size 32] [--backbone resnet18] [--steps 5]

MAE needs a ViT, so it runs with vit_tiny whatever --backbone says. Prints a table and the torch version/device.
"""

from __future__ import annotations

import argparse
import time

import torch

from ssl_core import available_methods, build_method


def step_seconds(name: str, backbone: str, batch_size: int, image_size: int, steps: int, device: torch.device) -> float:
    config = {"backbone": "vit_tiny" if name == "mae" else backbone, "image_size": image_size}
    if name == "moco":
        config["queue_size"] = 4096
    if name == "dino":
        config["out_dim"] = 4096
    method = build_method(name, config).to(device)
    views = method.view_generator()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, device=device)
    generator = torch.Generator().manual_seed(0)
    timings = []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = method.training_step(views(images, generator)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.on_after_optimizer_step(step, steps + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
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
        backbone = "vit_tiny" if name == "mae" else args.backbone
        print(f"{name:<14}{backbone:<11}{seconds:>8.3f}{args.batch_size / seconds:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
