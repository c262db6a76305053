"""Every registered method pretrained on the same real data for the same time budget, then one table: method,
backbone, epochs done, images/s, kNN top-1 and linear-probe top-1, with an untrained encoder of each backbone and
raw pixels as floors.

    python benchmarks/methods.py [--minutes 5] [--clock wall|cpu] [--threads N] [--datasets fashion_mnist tiny32]
                                 [--methods jigsaw simclr ...] [--backbone resnet20] [--image-size 32]
                                 [--batch-size 128] [--lr 1e-3]

The budget is wall-clock time by default; ``--clock cpu`` counts this process's CPU time instead, so that methods
timed on a machine shared with other work still get equal compute (images/s is then images per CPU-second).

Data (``../shared/datasets``, see its README):

- ``fashion_mnist``: pretraining on the 60000 training images (labels ignored), 28 px grayscale resized to
  ``--image-size``; kNN bank and linear-probe training set: the first ``--bank-images`` training images with their
  labels; test: the first ``--test-images`` of the official test split. Raw-pixel floor in the README: 20-NN 0.841.
- ``tiny32``: pretraining on the 10000 unlabeled Tiny-ImageNet test images (32x32); bank / test: a seeded 80/20
  split of the 10000 labeled validation images (200 classes). README floor: raw-pixel 20-NN about 0.05.

Training runs in this process, without Ray, through the pipeline's training step (``ssl_core.training.TrainStep``
with ``ssl_objective``): it measures the methods, not Ray's start-up. Every method gets the same optimizer (AdamW,
``--lr``, weight decay 1e-4, batch ``--batch-size``, each with its paper-default config at ``--image-size``
except the CPU-size overrides of ``common.method_settings``; MAE and the other ViT-only methods use ``vit_tiny``) and the same budget: a 3-step calibration sets the number of steps
that fits, the cosine learning-rate schedule and the methods' EMA schedules span those steps, and training stops
when the budget is spent (``epochs done`` counts the steps actually taken). Batches carry ``row_index`` (the
memory-bank methods need it) and memory banks are sized to the pretraining set. The budget counts training only;
feature extraction, kNN (k=20, temperature 0.07) and the linear probe (50 epochs, AdamW) come after.

Prints the table per dataset as Markdown, and writes it under ``bench_runs/methods/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, REPO, method_settings  # noqa: E402

from ssl_core import available_methods, build_backbone, build_method  # noqa: E402
from ssl_core.augment import Normalization  # noqa: E402
from ssl_core.device import model_to_memory_format  # noqa: E402
from ssl_core.evaluate import extract_features, knn_accuracy, linear_probe  # noqa: E402
from ssl_core.methods.base import ROW_INDEX  # noqa: E402
from ssl_core.optim import build_optimizer, warmup_cosine  # noqa: E402
from ssl_core.training import TrainStep, seed_epoch, ssl_objective  # noqa: E402

@dataclasses.dataclass(frozen=True)
class BenchData:
    name: str
    train: torch.Tensor  # uint8 (N, C, S, S), unlabeled pretraining images
    bank: torch.Tensor
    bank_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


def _to_images(array: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, 3) -> uint8 (N, C, image_size, image_size)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    if tensor.shape[-1] != image_size:
        tensor = F.interpolate(tensor.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    return tensor.contiguous()


def load_data(name: str, image_size: int, bank_images: int, test_images: int, datasets: Path) -> BenchData:
    if name == "fashion_mnist":
        train, test = np.load(datasets / "fashion_mnist_train.npz"), np.load(datasets / "fashion_mnist_test.npz")
        images = _to_images(train["x"], image_size)
        return BenchData(name, images, images[:bank_images], torch.from_numpy(train["y"][:bank_images]).long(),
                         _to_images(test["x"][:test_images], image_size),
                         torch.from_numpy(test["y"][:test_images]).long(), 10)
    if name == "tiny32":
        unlabeled, labeled = np.load(datasets / "tiny32_test_unlabeled.npz"), np.load(datasets / "tiny32_val.npz")
        images, labels = _to_images(labeled["x"], image_size), torch.from_numpy(labeled["y"]).long()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(images))
        bank, test = order[:cut][:bank_images], order[cut:][:test_images]
        return BenchData(name, _to_images(unlabeled["x"], image_size), images[bank], labels[bank], images[test],
                         labels[test], 200)
    raise ValueError(f"unknown dataset {name!r}; known: fashion_mnist, tiny32")


def scores(encoder: torch.nn.Module, data: BenchData, normalize, device: torch.device) -> tuple[float, float]:
    """(kNN top-1, linear-probe top-1) of ``encoder``'s features on ``data``'s bank / test."""
    bank = extract_features(encoder, data.bank, device=device, normalize=normalize)
    test = extract_features(encoder, data.test, device=device, normalize=normalize)
    return _feature_scores(bank, test, data, device)


def _feature_scores(bank: torch.Tensor, test: torch.Tensor, data: BenchData, device: torch.device):
    knn = knn_accuracy(bank, data.bank_labels, test, data.test_labels, num_classes=data.num_classes, k=20)["top1"]
    linear = linear_probe(bank, data.bank_labels, test, data.test_labels, num_classes=data.num_classes, epochs=50,
                          device=device)["top1"]
    return knn, linear


def pretrain(name: str, data: BenchData, args: argparse.Namespace, device: torch.device) -> dict:
    """Train ``name`` for ``args.minutes`` on ``args.clock``; returns the row of the table."""
    settings = method_settings(name, args.backbone, args.image_size)
    torch.manual_seed(0)
    method = model_to_memory_format(build_method(name, settings, train_rows=len(data.train)).to(device), device)
    optimizer = build_optimizer(method.param_groups(1e-4), "adamw", args.lr, 1e-4)
    objective = ssl_objective(method.view_generator(), device)
    total_steps = [3]  # replaced after calibration: the schedules span the steps that fit the budget
    lr_at = lambda step: warmup_cosine(min(step, total_steps[0] - 1), total_steps=total_steps[0],  # noqa: E731
                                       warmup_steps=0, base_value=args.lr)
    after = lambda step: method.on_after_optimizer_step(min(step, total_steps[0] - 1), total_steps[0])  # noqa: E731
    train_step = TrainStep(method, objective, optimizer, lr_at, device=device, what=f"method {name}",
                           after_step=after)
    batch_size, rows = args.batch_size, len(data.train)
    budget = args.minutes * 60
    clock = CLOCKS[args.clock]
    step, epoch, seen = 0, 0, 0
    started = clock()
    while True:
        generator = seed_epoch(0, epoch, 0)
        order = torch.randperm(rows, generator=generator)
        for first in range(0, rows - batch_size + 1, batch_size):
            index = order[first : first + batch_size]
            batch = {"image": data.train[index].to(device, non_blocking=True), ROW_INDEX: index}
            train_step(batch, step, generator)
            step, seen = step + 1, seen + batch_size
            if step == 3:  # calibration: the schedules' length from the first 3 steps' pace
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                pace = (clock() - started) / 3
                total_steps[0] = max(4, math.floor(budget / pace))
            if step % 10 == 0 and device.type == "cuda":
                torch.cuda.synchronize(device)
            if clock() - started >= budget:
                break
        else:
            epoch += 1
            continue
        break
    train_step.guard.check()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = clock() - started
    knn, linear = scores(method.encoder, data, method.normalization(), device)
    return {"method": name, "backbone": settings["backbone"], "epochs": seen / rows, "steps": step,
            "images_per_s": seen / elapsed, "knn_top1": knn, "linear_top1": linear}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""The budget's clock. ``cpu`` (this process's CPU time, all its threads) gives every method the same compute when
the machine is shared with other work; with one torch thread on an otherwise quiet CPU it equals wall time."""


def floors(data: BenchData, backbones: list[str], args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for backbone in backbones:
        torch.manual_seed(0)
        encoder = build_backbone(backbone, small_images=True, image_size=args.image_size).to(device)
        knn, linear = scores(encoder, data, Normalization(), device)
        rows.append({"method": f"(untrained {backbone})", "backbone": backbone, "knn_top1": knn, "linear_top1": linear})
    bank = data.bank.flatten(1).float() / 255
    test = data.test.flatten(1).float() / 255
    knn, linear = _feature_scores(bank, test, data, device)
    rows.append({"method": "(raw pixels)", "backbone": "-", "knn_top1": knn, "linear_top1": linear})
    return rows


def table(rows: list[dict], rate_name: str = "images/s") -> str:
    lines = [f"| method | backbone | epochs done | {rate_name} | kNN top-1 | linear top-1 |", "|---|---|---|---|---|---|"]
    for row in rows:
        epochs = f"{row['epochs']:.2f}" if "epochs" in row else "-"
        rate = f"{row['images_per_s']:.0f}" if "images_per_s" in row else "-"
        lines.append(f"| {row['method']} | {row['backbone']} | {epochs} | {rate} | {row['knn_top1']:.4f} | "
                     f"{row['linear_top1']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="pretraining budget per method and dataset")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (fair on a shared machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--datasets", nargs="+", default=["fashion_mnist", "tiny32"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bank-images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--datasets-dir", type=Path, default=DATASETS)
    parser.add_argument("--out", type=Path, default=REPO / "bench_runs" / "methods")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = args.methods or available_methods()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} torch threads")
    for dataset in args.datasets:
        data = load_data(dataset, args.image_size, args.bank_images, args.test_images, args.datasets_dir)
        rows = []
        for name in methods:
            try:
                rows.append(pretrain(name, data, args, device))
            except Exception as error:  # one failing method must not hide the others' results
                print(f"[{dataset}] {name}: FAILED {type(error).__name__}: {error}", flush=True)
                continue
            row = rows[-1]
            print(f"[{dataset}] {name}: {row['epochs']:.2f} epochs, {row['images_per_s']:.0f} images/s, "
                  f"kNN {row['knn_top1']:.4f}, linear {row['linear_top1']:.4f}", flush=True)
        backbones = sorted({row["backbone"] for row in rows})
        rows += floors(data, backbones, args, device)
        header = (f"{dataset}: {len(data.train)} pretraining images, {args.minutes:g} min of {args.clock} time per "
                  f"method, batch "
                  f"{args.batch_size}, {args.image_size} px, AdamW lr {args.lr:g}; kNN/linear on {len(data.bank)} "
                  f"bank / {len(data.test)} test images; {machine}")
        text = f"{header}\n\n{table(rows, 'images/CPU-s' if args.clock == 'cpu' else 'images/s')}\n"
        print("\n" + text, flush=True)
        (args.out / f"{dataset}.md").write_text(text)


if __name__ == "__main__":
    main()
