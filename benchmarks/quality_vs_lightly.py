"""lightly's SimCLR against ours on the same data and the same compute budget, scored with the same weighted kNN.

    python benchmarks/quality_vs_lightly.py DATA --minutes M [--clock cpu|wall] [--threads N] [--batch-size 256]
                                            [--backbone resnet18|resnet20]

DATA: ``tiny32`` (pretrain on the 10000 unlabeled Tiny-ImageNet test images; kNN bank/test: a seeded 80/20 split of
the labeled validation images) or ``fashion_mnist`` (pretrain on the 60000 training images, bank: the first
``--bank-images`` training images, test: the first ``--test-images`` test images), both from ../shared/datasets
(grayscale is repeated to 3 channels so every variant sees the same RGB images).

Rows (each pretrained for ``--minutes`` of ``--clock`` time; ``cpu`` counts the CPU time of this process and of its
children, so lightly's DataLoader workers are charged to lightly):

  lightly          lightly's CIFAR-10 benchmark recipe for SimCLR: its SimCLRTransform (input 32, cj_strength 0.5,
                   no blur) per image in a torch DataLoader, its SimCLRProjectionHead(feature dim, 512, 128), its
                   NTXentLoss (temperature 0.5), SGD lr 0.06 x batch/128, momentum 0.9, weight decay 5e-4, cosine
                   schedule; backbone: ``--backbone`` with the CIFAR stem (3x3 conv, no max-pool): ResNet-18 by
                   default, as in lightly's benchmark; ``resnet20`` (CIFAR ResNet-20, 10x the images per CPU-second)
                   ranks the two like for like at budgets where ResNet-18 does too few steps to leave the untrained
                   encoder.
  ours, same       the same backbone, head sizes, temperature and optimizer settings, through our pipeline's step
                   (``ssl_core.training.TrainStep`` of ``ssl_objective``: batched on-device views, our NT-Xent).
  ours, recipe     our recipe for the data (``ssl_core.recipes.recipe("simclr", image_size)``).
  floors           the untrained encoders and raw pixels.

Every run's schedule spans the steps that fit the budget, re-projected every ``--unit-steps`` steps (default
``UNIT_STEPS``) from the measured pace, and the run stops at the end of the unit that would otherwise cross the budget
(``ssl_core.budget.EpochBudget`` with units of ``--unit-steps`` steps for epochs). Keep the unit at 1 when a run does
few steps: with units of 5 steps of 47 CPU-s, a 300 CPU-s budget stops at 235 s, and runs of different step times
lose different shares of their budget. kNN: weighted, k=200, temperature 0.1, cosine
(``ssl_core.evaluate.knn_accuracy``) on the encoder's pooled features. ``--seed`` (default 0) seeds every run's
initialisation, data order and augmentations; the kNN bank/test split stays fixed, so seeds differ in training only.
Prints a Markdown table and a last machine-readable line, and appends both to ``--log``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import BenchData, load_data  # noqa: E402

from common import DATASETS, REPO  # noqa: E402
from ssl_core import build_backbone, build_method  # noqa: E402
from ssl_core.augment import Normalization  # noqa: E402
from ssl_core.budget import EpochBudget  # noqa: E402
from ssl_core.device import model_to_memory_format, views_to_memory_format  # noqa: E402
from ssl_core.evaluate import extract_features, knn_accuracy  # noqa: E402
from ssl_core.methods import StepOutput  # noqa: E402
from ssl_core.optim import build_optimizer, scaled_lr, warmup_cosine  # noqa: E402
from ssl_core.recipes import recipe  # noqa: E402
from ssl_core.training import TrainStep, seed_epoch, ssl_objective  # noqa: E402

UNIT_STEPS = 1
KNN_K, KNN_TEMPERATURE = 200, 0.1
LIGHTLY_LR_PER_128 = 0.06  # lightly's cifar10 benchmark: lr = 6e-2 x batch / 128
LIGHTLY_WEIGHT_DECAY = 5e-4
LIGHTLY_TEMPERATURE = 0.5


def process_tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (DataLoader workers)."""
    process = psutil.Process()
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
    return total


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": process_tree_cpu_seconds}


@dataclasses.dataclass
class Run:
    name: str
    backbone: str
    steps: int
    seconds: float
    images_per_second: float
    knn_top1: float


def budgeted_training(step: Callable[[int], None], budget: EpochBudget,
                      clock: Callable[[], float]) -> tuple[int, float]:
    """Call ``step(i)`` in units of ``budget.steps_per_epoch`` until ``budget`` says stop; (steps, seconds used)."""
    started = clock()
    done = 0
    while True:
        for _ in range(budget.steps_per_epoch):
            step(done)
            done += 1
            budget.observe_steps(done, clock() - started)
        if not budget.end_epoch(done // budget.steps_per_epoch, clock() - started):
            return done, clock() - started


def batches_forever(data: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    epoch = 0
    while True:
        order = torch.randperm(len(data), generator=seed_epoch(seed, epoch, 0))
        for first in range(0, len(data) - batch_size + 1, batch_size):
            yield data[order[first:first + batch_size]]
        epoch += 1


def knn_score(encoder: nn.Module, data: BenchData, normalize: Callable[[Tensor], Tensor] | None) -> float:
    bank = extract_features(encoder, data.bank, normalize=normalize)
    test = extract_features(encoder, data.test, normalize=normalize)
    return knn_accuracy(bank, data.bank_labels, test, data.test_labels, num_classes=data.num_classes, k=KNN_K,
                        temperature=KNN_TEMPERATURE)["top1"]


def run_lightly(data: BenchData, args: argparse.Namespace, device: torch.device) -> Run:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from PIL import Image

    torch.manual_seed(args.seed)
    encoder = build_backbone(args.backbone, small_images=True, image_size=args.image_size)
    head = SimCLRProjectionHead(encoder.feature_dim, 512, 128)
    model = model_to_memory_format(nn.Sequential(encoder, head).to(device), device)
    criterion = NTXentLoss(temperature=LIGHTLY_TEMPERATURE)
    lr = LIGHTLY_LR_PER_128 * args.batch_size / 128
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=LIGHTLY_WEIGHT_DECAY)
    transform = SimCLRTransform(input_size=args.image_size, cj_strength=0.5, gaussian_blur=0.0)

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data.train)

        def __getitem__(self, index: int):
            return transform(Image.fromarray(data.train[index].permute(1, 2, 0).numpy()))

    loader = torch.utils.data.DataLoader(Images(), batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.loader_workers, persistent_workers=args.loader_workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))

    def forever() -> Iterator[list[Tensor]]:
        while True:
            yield from loader

    views = forever()
    budget = EpochBudget(args.minutes * 60, args.unit_steps, max_epochs=1 << 30)
    lr_at = lambda step: warmup_cosine(min(step, budget.total_steps), budget.total_steps, 0, lr)  # noqa: E731

    def objective(model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> StepOutput:
        z0, z1 = model(torch.cat([batch["view1"], batch["view2"]])).chunk(2)
        return StepOutput(criterion(z0, z1))

    train_step = TrainStep(model, objective, optimizer, lr_at, device=device, what="lightly simclr")
    generator = torch.Generator().manual_seed(args.seed)

    def step(index: int) -> None:
        view1, view2 = next(views)
        train_step(views_to_memory_format({"view1": view1.to(device), "view2": view2.to(device)}, device), index,
                   generator)

    steps, seconds = budgeted_training(step, budget, CLOCKS[args.clock])
    train_step.guard.check()
    loader._iterator = None  # stops the persistent DataLoader workers before the scoring
    score = knn_score(encoder, data, Normalization())  # lightly's transform ends with ImageNet mean/std
    return Run("lightly (its transforms, loss, SGD recipe)", f"{args.backbone} CIFAR stem", steps, seconds,
               steps * args.batch_size / seconds, score)


def run_ours(name: str, data: BenchData, args: argparse.Namespace, device: torch.device, settings: dict,
             optimizer_name: str, lr: float, weight_decay: float, warmup_fraction: float) -> Run:
    torch.manual_seed(args.seed)
    method = model_to_memory_format(build_method("simclr", settings).to(device), device)
    optimizer = build_optimizer(method.param_groups(weight_decay), optimizer_name, lr, weight_decay)
    units = 1 << 30  # no cap: the budget alone ends the run
    budget = EpochBudget(args.minutes * 60, args.unit_steps, max_epochs=units,
                         warmup_steps=round(warmup_fraction * units * args.unit_steps))
    lr_at = lambda step: warmup_cosine(min(step, budget.total_steps), budget.total_steps,  # noqa: E731
                                       min(budget.warmup_steps, budget.total_steps), lr)
    train_step = TrainStep(method, ssl_objective(method.view_generator(), device), optimizer, lr_at, device=device,
                           what=name)
    batches = batches_forever(data.train, args.batch_size, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    steps, seconds = budgeted_training(lambda i: train_step({"image": next(batches).to(device)}, i, generator),
                                       budget, CLOCKS[args.clock])
    train_step.guard.check()
    score = knn_score(method.encoder, data, method.normalization())
    stem = "CIFAR stem" if settings.get("small_images", True) else "ImageNet stem"
    return Run(name, f"{settings['backbone']} {stem}", steps, seconds, steps * args.batch_size / seconds, score)


def run_all(data: BenchData, args: argparse.Namespace, device: torch.device) -> list[Run]:
    runs = [run_lightly(data, args, device)]
    print(f"  {runs[-1]}", flush=True)
    same = {"backbone": args.backbone, "small_images": True, "image_size": args.image_size, "temperature":
            LIGHTLY_TEMPERATURE, "projection_layers": 2, "projection_hidden_dim": 512, "projection_dim": 128}
    runs.append(run_ours("ours, like for like (same backbone, head, loss temperature, SGD recipe)", data, args,
                         device, same, "sgd", LIGHTLY_LR_PER_128 * args.batch_size / 128, LIGHTLY_WEIGHT_DECAY, 0.0))
    print(f"  {runs[-1]}", flush=True)
    chosen = recipe("simclr", args.image_size)
    settings = {**chosen.backbone, **chosen.objective, "image_size": args.image_size}
    p = chosen.optimizer
    runs.append(run_ours(f"ours, recipe ({p['optimizer']} lr {p['lr']:g}, wd {p['weight_decay']:g})", data, args,
                         device, settings, p["optimizer"], scaled_lr(p["lr"], args.batch_size, p["lr_scaling"]),
                         p["weight_decay"], 0.1))
    print(f"  {runs[-1]}", flush=True)
    return runs


def floors(data: BenchData, backbones: list[str], device: torch.device, seed: int) -> list[tuple[str, float]]:
    rows = []
    for backbone in backbones:
        torch.manual_seed(seed)
        encoder = build_backbone(backbone, small_images=True, image_size=data.train.shape[-1]).to(device)
        rows.append((f"untrained {backbone} CIFAR stem", knn_score(encoder, data, Normalization())))
    pixels = lambda images: images.flatten(1).float() / 255  # noqa: E731
    rows.append(("raw pixels", knn_accuracy(pixels(data.bank), data.bank_labels, pixels(data.test), data.test_labels,
                                            num_classes=data.num_classes, k=KNN_K,
                                            temperature=KNN_TEMPERATURE)["top1"]))
    return rows


def to_rgb(data: BenchData) -> BenchData:
    expand = lambda images: images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images  # noqa: E731
    return dataclasses.replace(data, train=expand(data.train), bank=expand(data.bank), test=expand(data.test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", choices=("tiny32", "fashion_mnist"))
    parser.add_argument("--minutes", type=float, required=True, help="pretraining budget per run")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--loader-workers", type=int, default=os.cpu_count() or 1,
                        help="lightly's DataLoader workers (default: one per core, as lightly's benchmark)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--backbone", choices=("resnet18", "resnet20"), default="resnet18",
                        help="the backbone of lightly's run and of ours like for like (CIFAR stem)")
    parser.add_argument("--unit-steps", type=int, default=UNIT_STEPS, help="steps between re-projections")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0,
                        help="every run's initialisation, data order and augmentations (the kNN split stays fixed)")
    parser.add_argument("--bank-images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--datasets-dir", type=Path, default=DATASETS)
    parser.add_argument("--log", type=Path, default=REPO / "bench_runs" / "quality_vs_lightly.md")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = to_rgb(load_data(args.data, args.image_size, args.bank_images, args.test_images, args.datasets_dir))
    print(f"{args.data}: {len(data.train)} pretraining images, {args.minutes:g} min of {args.clock} time per run, "
          f"batch {args.batch_size}, {args.image_size} px, torch threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    runs = run_all(data, args, device)
    floor_rows = floors(data, sorted({args.backbone, recipe("simclr", args.image_size).backbone["backbone"]}),
                        device, args.seed)
    rate = "images/CPU-s" if args.clock == "cpu" else "images/s"
    lines = [f"### {args.data}, {args.minutes:g} {args.clock}-minutes per run, seed {args.seed}, "
             f"batch {args.batch_size}, kNN k={KNN_K} t={KNN_TEMPERATURE} on {len(data.bank)} bank / "
             f"{len(data.test)} test images",
             "", f"| run | backbone | steps | epochs | {args.clock} s | {rate} | kNN top-1 |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        epochs = run.steps * args.batch_size / len(data.train)
        lines.append(f"| {run.name} | {run.backbone} | {run.steps} | {epochs:.2f}"
                     f" | {run.seconds:.0f} | {run.images_per_second:.1f} | {run.knn_top1:.4f} |")
    for name, score in floor_rows:
        lines.append(f"| ({name}) | - | - | - | - | - | {score:.4f} |")
    lightly_score, same, ours = (run.knn_top1 for run in runs)
    summary = (f"{args.data} {args.minutes:g}min {args.clock} {args.backbone} seed {args.seed}: "
               f"lightly={lightly_score:.4f} same={same:.4f} recipe={ours:.4f} "
               f"same-lightly={same - lightly_score:+.4f} recipe-lightly={ours - lightly_score:+.4f}")
    text = "\n".join(lines) + "\n\n" + summary + "\n"
    print("\n" + text, flush=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a") as log:
        log.write(text + "\n")


if __name__ == "__main__":
    main()
