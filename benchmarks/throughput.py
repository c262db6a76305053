"""Images/s of a pretraining step, our paths against a bare PyTorch loop and lightly, side by side in one process.

    python benchmarks/throughput.py                          # SimCLR ResNet-18 32x32 batch 256 (CPU: a few minutes)
    python benchmarks/throughput.py --methods simclr moco byol dino mae --sizes 32 96 --batch-size 256 --steps 10
    python benchmarks/throughput.py --no-ray                 # without Ray (e.g. a GPU machine without Ray's wheel)
    python benchmarks/throughput.py --no-ray --profile       # + torch.profiler of variant b': where a step goes

Variants (the same model, loss sizes and optimizer, LARS, in all four; bf16 autocast and channels_last on CUDA):

  a   bare PyTorch loop over pre-made, already augmented views in device memory: the model's practical limit.
  b'  our step without Ray: uint8 batches in (pinned) host memory -> non-blocking copy -> ssl_core.augment views on
      the device -> the method's training_step -> backward -> LARS -> EMA/queue update (the pretrain stage's loop).
  b   the pipelines' pretrain stage on Ray Train (1 worker): Parquet -> Ray Data read/decode tasks -> streamed
      batches -> on-device views -> step; images/s of its second epoch, as the stage reports it (the first epoch is
      the warm-up). Ray's own overhead is b/b'.
  c   lightly's loop: lightly's transforms (PIL, per image) in a torch DataLoader with one worker per CPU core,
      lightly's loss (NTXentLoss, NTXentLoss with a memory bank for MoCo, NegativeCosineSimilarity, DINOLoss) and
      lightly's momentum update, on the same backbone and heads. MAE has no lightly loss (lightly's example uses
      torch's MSE): c runs our MAE step on lightly's MAETransform data path.

Augmentation recipes match across b/b' and c (at < 64 px, no blur, as the papers' CIFAR recipes). DINO uses 2 global
and 4 local crops (2x32 + 4x16 at 32 px); MAE runs on vit_tiny. Images: real Tiny-ImageNet 32x32
(../shared/datasets), resized for larger sizes. Prints a table and, last, one machine-readable line per case, e.g.
``simclr resnet18 32px batch256 cpu: b/a=0.93 b/c=1.41 b'/a=0.95 b'/c=1.44 b/b'=0.98``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DATASETS,
    REPO,
    RayPathRun,
    backbone_for,
    default_cpus_per_worker,
    images_per_second,
    load_images,
    method_settings,
    ray_path_images_per_second,
    start_ray,
)

from ssl_core import build_method  # noqa: E402
from ssl_core.augment import local_crop_size  # noqa: E402
from ssl_core.device import autocast, compile_or_eager, uses_channels_last, views_to_memory_format  # noqa: E402
from ssl_core.methods import SSLMethod  # noqa: E402
from ssl_core.optim import LARS  # noqa: E402

VARIANTS = ("a", "b'", "b", "c")
POOL_BATCHES = 2  # distinct batches cycled through by a and b'
WEIGHT_DECAY = 1e-6
BASE_LR = 0.3  # x batch / 256, as the pretrain stage (LARS)


@dataclass(frozen=True)
class Case:
    method: str
    backbone: str
    image_size: int
    batch_size: int

    def label(self, device: torch.device) -> str:
        return f"{self.method} {self.backbone} {self.image_size}px batch{self.batch_size} {device.type}"


@dataclass
class Model:
    method: SSLMethod
    model: nn.Module  # the method, or its compiled wrapper
    optimizer: torch.optim.Optimizer


def build_model(case: Case, device: torch.device, compile_model: bool) -> Model:
    torch.manual_seed(0)
    method = build_method(case.method, method_settings(case.method, case.backbone, case.image_size)).to(device)
    if uses_channels_last(device):
        method = method.to(memory_format=torch.channels_last)
    optimizer = LARS(method.param_groups(WEIGHT_DECAY), lr=BASE_LR * case.batch_size / 256, momentum=0.9,
                     weight_decay=WEIGHT_DECAY)
    return Model(method, compile_or_eager(method) if compile_model else method, optimizer)


def our_step(m: Model, views: dict[str, Tensor], step: int, total_steps: int, device: torch.device) -> None:
    """The pretrain stage's step (pipelines/stages/pretrain.py), without Ray and without host synchronisation."""
    with autocast(device):
        loss = m.model(views).loss
    m.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    m.optimizer.step()
    m.method.on_after_optimizer_step(step, total_steps)


def host_batches(case: Case, device: torch.device, count: int) -> list[Tensor]:
    """``count`` uint8 batches of real images in host memory, pinned when the device is CUDA."""
    images = load_images(count * case.batch_size, case.image_size)
    if device.type == "cuda":
        images = images.pin_memory()
    return list(images.split(case.batch_size))


def run_bare(case: Case, device: torch.device, warmup: int, steps: int, compile_model: bool) -> float:
    """a: pre-made views in device memory (augmented once, outside the timing)."""
    m = build_model(case, device, compile_model)
    generator = torch.Generator().manual_seed(0)
    views = m.method.view_generator()
    pool = [views_to_memory_format(views(batch.to(device), generator), device)
            for batch in host_batches(case, device, POOL_BATCHES)]
    total = warmup + steps
    return images_per_second(lambda i: our_step(m, pool[i % len(pool)], i, total, device),
                             batch_size=case.batch_size, warmup=warmup, steps=steps, device=device)


def ours_step_fn(case: Case, device: torch.device, total: int, compile_model: bool) -> Callable[[int], None]:
    """b': host uint8 batch -> non-blocking copy -> on-device views -> our step."""
    m = build_model(case, device, compile_model)
    generator = torch.Generator().manual_seed(0)
    views = m.method.view_generator()
    batches = host_batches(case, device, POOL_BATCHES)

    def step(i: int) -> None:
        batch = batches[i % len(batches)].to(device, non_blocking=True)
        our_step(m, views_to_memory_format(views(batch, generator), device), i, total, device)

    return step


def run_ours(case: Case, device: torch.device, warmup: int, steps: int, compile_model: bool) -> float:
    """b'. On CUDA the timed steps run under ``torch.cuda.set_sync_debug_mode("warn")``, and the host-device
    synchronisations it reports (there should be none) are printed."""
    step = ours_step_fn(case, device, warmup + steps, compile_model)
    if device.type != "cuda":
        return images_per_second(step, batch_size=case.batch_size, warmup=warmup, steps=steps, device=device)

    def checked_step(i: int) -> None:
        if i < warmup:
            return step(i)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rate = images_per_second(checked_step, batch_size=case.batch_size, warmup=warmup, steps=steps, device=device)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    print(f"  {case.label(device)}  b' host-device synchronisations in {steps} timed steps: {len(syncs)}"
          + (f" (first: {syncs[0].splitlines()[0]})" if syncs else ""), flush=True)
    return rate


# ---------------------------------------------------------------------------------------------------- lightly (c)

def lightly_transform(method: str, image_size: int):
    """lightly's transform for ``method`` with the recipe of our ``ssl_core.augment.preset``."""
    from lightly import transforms as T

    small = image_size < 64
    if method == "simclr":
        return T.SimCLRTransform(input_size=image_size, cj_strength=0.5 if small else 1.0,
                                 gaussian_blur=0.0 if small else 0.5)
    if method == "moco":
        return T.MoCoV2Transform(input_size=image_size, gaussian_blur=0.0 if small else 0.5)
    if method == "byol":
        return T.BYOLTransform(T.BYOLView1Transform(input_size=image_size, gaussian_blur=0.0 if small else 1.0),
                               T.BYOLView2Transform(input_size=image_size, gaussian_blur=0.0 if small else 0.1))
    if method == "dino":
        blur = (0.0, 0.0, 0.0) if small else (1.0, 0.1, 0.5)
        return T.DINOTransform(global_crop_size=image_size, local_crop_size=local_crop_size(image_size),
                               n_local_views=method_settings("dino", "resnet18", image_size)["num_local_crops"],
                               gaussian_blur=blur)
    if method == "mae":
        return T.MAETransform(input_size=image_size)
    raise ValueError(f"no lightly equivalent for method {method!r}")


def lightly_loss_fn(m: Model) -> tuple[Callable[[list[Tensor]], Tensor], Callable[[int, int], None]]:
    """(loss of a list of views, update after the optimizer step) in lightly's terms, on our method's modules."""
    from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss
    from lightly.models.utils import update_momentum

    method, config = m.method, m.method.config
    device = next(method.parameters()).device

    def momentum_update(step: int, total: int) -> None:
        momentum = method.momentum_at(step, total)
        for online, teacher in method.ema_pairs():
            update_momentum(online, teacher, momentum)

    if method.name == "simclr":
        criterion = NTXentLoss(temperature=config.temperature).to(device)

        def loss(views: list[Tensor]) -> Tensor:
            z0, z1 = method.projection_head(method.encoder(torch.cat(views))).float().chunk(2)
            return criterion(z0, z1)

        return loss, lambda step, total: None
    if method.name == "moco":
        criterion = NTXentLoss(temperature=config.temperature,
                               memory_bank_size=(config.queue_size, config.projection_dim)).to(device)

        def loss(views: list[Tensor]) -> Tensor:
            q0, q1 = method.projection_head(method.encoder(torch.cat(views))).float().chunk(2)
            with torch.no_grad():
                k0, k1 = (method.key_projection_head(method.key_encoder(v)).float() for v in views)
            return 0.5 * (criterion(q0, k1) + criterion(q1, k0))

        return loss, momentum_update
    if method.name == "byol":
        criterion = NegativeCosineSimilarity().to(device)

        def loss(views: list[Tensor]) -> Tensor:
            p0, p1 = method.prediction_head(method.projection_head(method.encoder(torch.cat(views)))).float().chunk(2)
            with torch.no_grad():
                t0, t1 = (method.target_projection_head(method.target_encoder(v)).float() for v in views)
            return 0.5 * (criterion(p0, t1) + criterion(p1, t0))

        return loss, momentum_update
    if method.name == "dino":
        criterion = DINOLoss(output_dim=config.out_dim, teacher_temp=config.teacher_temperature,
                             warmup_teacher_temp=config.warmup_teacher_temperature,
                             student_temp=config.student_temperature, center_momentum=config.center_momentum)
        criterion = criterion.to(device)

        def loss(views: list[Tensor]) -> Tensor:
            global_views, local_views = views[:2], views[2:]
            batch = global_views[0].shape[0]
            student = [method.head(method.encoder(torch.cat(global_views))).float()]
            if local_views:
                student.append(method.head(method.encoder(torch.cat(local_views))).float())
            with torch.no_grad():
                teacher = method.teacher_head(method.teacher_encoder(torch.cat(global_views))).float().split(batch)
            return criterion(list(teacher), list(torch.cat(student).split(batch)),
                             teacher_temp=config.teacher_temperature)

        return loss, momentum_update
    if method.name == "mae":
        return lambda views: method.training_step({"view1": views[0]}).loss, lambda step, total: None
    raise ValueError(f"no lightly equivalent for method {method.name!r}")


class PILImages(torch.utils.data.Dataset):
    """Real images as PIL images, through a per-image transform (lightly's data path)."""

    def __init__(self, images: Tensor, transform) -> None:
        from PIL import Image

        self.images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index])


def run_lightly(case: Case, device: torch.device, warmup: int, steps: int, compile_model: bool) -> float:
    """c: lightly transforms in DataLoader workers (one per core), lightly's loss on the same model and optimizer."""
    m = build_model(case, device, compile_model)
    loss_fn, after_step = lightly_loss_fn(m)
    total = warmup + steps
    dataset = PILImages(load_images(total * case.batch_size, case.image_size),
                        lightly_transform(case.method, case.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=case.batch_size, shuffle=True, drop_last=True,
                                         num_workers=os.cpu_count() or 1, pin_memory=device.type == "cuda")
    batches = iter(loader)

    def step(i: int) -> None:
        views = list(views_to_memory_format(
            {str(k): v.to(device, non_blocking=True) for k, v in enumerate(next(batches))}, device).values())
        with autocast(device):
            loss = loss_fn(views)
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        m.optimizer.step()
        after_step(i, total)

    try:
        return images_per_second(step, batch_size=case.batch_size, warmup=warmup, steps=steps, device=device)
    finally:
        del batches


# ------------------------------------------------------------------------------------------------------- profile

def profile_ours(case: Case, device: torch.device, steps: int, compile_model: bool, rows: int = 15) -> None:
    """torch.profiler over ``steps`` steps of b' (after one warm-up), with the step's phases labelled."""
    from torch.profiler import ProfilerActivity, profile, record_function

    m = build_model(case, device, compile_model)
    generator = torch.Generator().manual_seed(0)
    views = m.method.view_generator()
    batches = host_batches(case, device, POOL_BATCHES)

    def step(i: int) -> None:
        with record_function("phase:copy"):
            batch = batches[i % len(batches)].to(device, non_blocking=True)
        with record_function("phase:augment"):
            batch_views = views_to_memory_format(views(batch, generator), device)
        with record_function("phase:forward"), autocast(device):
            loss = m.model(batch_views).loss
        with record_function("phase:backward"):
            m.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("phase:optimizer"):
            m.optimizer.step()
            m.method.on_after_optimizer_step(i, steps + 1)

    step(0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(1, steps + 1):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of b' ({case.label(device)}, {steps} steps): phases (wall time on the host)")
    phases = [event for event in averages if event.key.startswith("phase:")]
    total_us = sum(event.cpu_time_total for event in phases) or 1.0
    for event in sorted(phases, key=lambda e: -e.cpu_time_total):
        print(f"  {event.key[6:]:<10}{event.cpu_time_total / 1e3 / steps:>10.1f} ms/step"
              f"{100 * event.cpu_time_total / total_us:>7.1f}%")
    print(averages.table(sort_by=sort_key, row_limit=rows))


# ---------------------------------------------------------------------------------------------------------- main

def parse_variants(values: list[str]) -> list[str]:
    aliases = {"bp": "b'", "bprime": "b'", "b_prime": "b'"}
    chosen = [aliases.get(v, v) for value in values for v in value.replace(",", " ").split()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: a, b' (or bp), b, c")
    return [v for v in VARIANTS if v in chosen]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{model or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def ratio(values: dict[str, float], top: str, bottom: str) -> str | None:
    if top in values and bottom in values and values[bottom] > 0:
        return f"{values[top] / values[bottom]:.2f}"
    return None


RATIOS = (("b", "a"), ("b", "c"), ("b'", "a"), ("b'", "c"), ("b", "b'"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["simclr"],
                        help="simclr moco byol dino mae (default: simclr)")
    parser.add_argument("--backbone", default="resnet18", help="CNN backbone (MAE always uses vit_tiny)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32], help="image sizes, e.g. 32 96")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant (default: 2 on CPU, 20 on CUDA); b times one epoch of them")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="any of a b' b c (b' may be written bp)")
    parser.add_argument("--no-ray", action="store_true", help="skip b (Ray Train): a, b' and c only")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (eager fallback) in all variants")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--profile", action="store_true", help="also run torch.profiler over b' and print where a step goes")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench_runs" / "throughput")
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    steps = args.steps or (20 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    variants = parse_variants(args.variants)
    if args.no_ray:
        variants = [v for v in variants if v != "b"]
    if not (DATASETS / "tiny32_test_unlabeled.npz").is_file():
        raise SystemExit(f"missing {DATASETS / 'tiny32_test_unlabeled.npz'} (see ../shared/datasets/README.md)")
    cases = [Case(method, backbone_for(method, args.backbone), size, args.batch_size)
             for size in args.sizes for method in args.methods]

    ray_version = "not used"
    if "b" in variants:
        import ray

        ray_version = ray.__version__  # started just before the first b (start_ray)
    try:
        import lightly

        lightly_version = lightly.__version__
    except ImportError:
        if "c" in variants:
            raise SystemExit('variant c needs lightly: pip install -e ".[bench]"') from None
        lightly_version = "not installed"

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"device {device.type}: {device_name(device)}", flush=True)
    print(f"torch {torch.__version__}, ray {ray_version}, lightly {lightly_version}, python {platform.python_version()}, "
          f"load average {load}", flush=True)
    print(f"variants {' '.join(variants)}; {warmup} warm-up + {steps} timed steps each; compile={args.compile}",
          flush=True)

    runners = {"a": run_bare, "b'": run_ours, "c": run_lightly}
    results: list[tuple[Case, dict[str, float]]] = []
    ray_started = False
    for case in cases:
        values: dict[str, float] = {}
        for variant in variants:
            if variant == "b":
                if not ray_started:
                    start_ray(os.cpu_count() or 2, 1 if cuda else 0)
                    ray_started = True
                run = RayPathRun(case.method, case.backbone, case.image_size, case.batch_size, steps_per_epoch=steps,
                                 cpus_per_worker=(1.0 if cuda else default_cpus_per_worker(os.cpu_count() or 2, 1)),
                                 use_gpu=cuda, compile=args.compile)
                values[variant] = ray_path_images_per_second(run, args.work_dir)
            else:
                values[variant] = runners[variant](case, device, warmup, steps, args.compile)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            print(f"  {case.label(device)}  {variant:<3}{values[variant]:>10.1f} images/s", flush=True)
        results.append((case, values))
        if args.profile:
            profile_ours(case, device, steps, args.compile)
    if ray_started:
        import ray

        ray.shutdown()

    header = f"\n{'method':<8}{'backbone':<10}{'size':>5}{'batch':>6}"
    header += "".join(f"{v + ' img/s':>11}" for v in variants)
    header += "".join(f"{t + '/' + b:>7}" for t, b in RATIOS if t in variants and b in variants)
    print(header)
    for case, values in results:
        row = f"{case.method:<8}{case.backbone:<10}{case.image_size:>5}{case.batch_size:>6}"
        row += "".join(f"{values[v]:>11.1f}" for v in variants)
        row += "".join(f"{ratio(values, t, b):>7}" for t, b in RATIOS if t in variants and b in variants)
        print(row)
    print()
    for case, values in results:
        parts = [f"{t}/{b}={ratio(values, t, b)}" for t, b in RATIOS if t in variants and b in variants]
        parts = parts or [f"{v}={values[v]:.1f}img/s" for v in variants]  # a single variant: no ratio
        print(f"{case.label(device)}: {' '.join(parts)}", flush=True)


if __name__ == "__main__":
    main()
