"""Images/s of a pretraining step, our paths against pre-made views and lightly, side by side in one process.

    python benchmarks/throughput.py                          # SimCLR ResNet-18 32x32 batch 256 (CPU: a few minutes)
    python benchmarks/throughput.py --methods simclr moco byol dino mae --sizes 32 96 --batch-size 256 --steps 10
    python benchmarks/throughput.py --no-ray                 # without Ray (e.g. a GPU machine without Ray's wheel)
    python benchmarks/throughput.py --no-ray --profile       # + torch.profiler of variant b': where a step goes

Variants (the same model, loss sizes and optimizer, LARS, in all four; bf16 autocast and channels_last on CUDA):

  a   the pipeline's training step (ssl_core.training.TrainStep) over pre-made, already augmented views in device
      memory: the model's practical limit.
  b'  the pipeline's step without Ray: uint8 batches in (pinned) host memory -> non-blocking copy -> TrainStep of
      ssl_core.training.ssl_objective: on-device views -> the method's training_step -> backward -> LARS ->
      EMA/queue update (exactly what the worker loop of pipelines/train_loop.py runs per batch).
  b   the pipelines' pretraining on Ray Train (1 worker): Parquet -> Ray Data read/decode tasks -> streamed
      batches -> on-device views -> step; images/s of its second epoch, as the worker loop reports it (the first
      epoch is the warm-up). Ray's own overhead is b/b'.
  c   lightly's data path and loss (lightly_loop.py): lightly's transforms (PIL, per image) in a torch DataLoader
      with one worker per CPU core, lightly's loss (NTXentLoss, NTXentLoss with a memory bank for MoCo,
      NegativeCosineSimilarity, DINOLoss) and lightly's momentum update, on the same backbone, heads and TrainStep.
      MAE has no lightly loss (lightly's example uses torch's MSE): c runs our MAE step on lightly's MAETransform.

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
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DATASETS,
    REPO,
    Case,
    RayPathRun,
    backbone_for,
    build_model,
    default_cpus_per_worker,
    images_per_second,
    load_images,
    ray_path_images_per_second,
    start_ray,
)
from lightly_loop import run_lightly  # noqa: E402

from ssl_core.device import views_to_memory_format  # noqa: E402
from ssl_core.methods import StepOutput  # noqa: E402
from ssl_core.training import ssl_objective  # noqa: E402

VARIANTS = ("a", "b'", "b", "c")
POOL_BATCHES = 2  # distinct batches cycled through by a and b'


def host_batches(case: Case, device: torch.device, count: int) -> list[Tensor]:
    """``count`` uint8 batches of real images in host memory, pinned when the device is CUDA."""
    images = load_images(count * case.batch_size, case.image_size)
    if device.type == "cuda":
        images = images.pin_memory()
    return list(images.split(case.batch_size))


def premade_views_objective(model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> StepOutput:
    """a's objective: the batch already holds the method's views (on the device, channels_last), so the step is
    ``ssl_objective``'s without the augmentation."""
    return model(batch)


def run_bare(case: Case, device: torch.device, warmup: int, steps: int, compile_model: bool) -> float:
    """a: pre-made views in device memory (augmented once, outside the timing), the pipeline's TrainStep."""
    m = build_model(case, device, compile_model)
    generator = torch.Generator().manual_seed(0)
    views = m.method.view_generator()
    pool = [views_to_memory_format(views(batch.to(device), generator), device)
            for batch in host_batches(case, device, POOL_BATCHES)]
    train_step = m.train_step(premade_views_objective, warmup + steps)
    return images_per_second(lambda i: train_step(pool[i % len(pool)], i, generator),
                             batch_size=case.batch_size, warmup=warmup, steps=steps, device=device)


def unlabelled(name: str, fn: Callable) -> Callable:
    return fn


def ours_step_fn(case: Case, device: torch.device, total: int, compile_model: bool,
                 label: Callable[[str, Callable], Callable] = unlabelled) -> Callable[[int], None]:
    """b': host uint8 batch -> non-blocking copy -> the pipeline's TrainStep of ``ssl_objective`` (on-device views,
    the method's training_step, backward, LARS, EMA/queue update). ``label(phase, fn)`` wraps the copy, the views,
    the model's forward and the whole step (the profiler's phases)."""
    m = build_model(case, device, compile_model)
    generator = torch.Generator().manual_seed(0)
    batches = host_batches(case, device, POOL_BATCHES)
    objective = ssl_objective(label("augment", m.method.view_generator()), device)
    m.model = label("forward", m.model)
    train_step = label("step", m.train_step(objective, total))
    copy = label("copy", lambda i: batches[i % len(batches)].to(device, non_blocking=True))

    def step(i: int) -> None:
        train_step({"image": copy(i)}, i, generator)

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


# ------------------------------------------------------------------------------------------------------- profile

def profile_ours(case: Case, device: torch.device, steps: int, compile_model: bool, rows: int = 15) -> None:
    """torch.profiler over ``steps`` steps of b' (after one warm-up). Phases: copy; augment and forward (inside the
    TrainStep); backward+optimizer = the rest of the TrainStep (zero_grad, backward, LARS, EMA/queue update)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def label(phase: str, fn: Callable) -> Callable:
        def labelled(*args):
            with record_function(f"phase:{phase}"):
                return fn(*args)

        return labelled

    step = ours_step_fn(case, device, steps + 1, compile_model, label)
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
    phase_us = {event.key[6:]: event.cpu_time_total for event in averages if event.key.startswith("phase:")}
    phase_us["backward+optimizer"] = phase_us.pop("step", 0.0) - phase_us.get("augment", 0.0) \
        - phase_us.get("forward", 0.0)
    total_us = sum(phase_us.values()) or 1.0
    for phase, us in sorted(phase_us.items(), key=lambda item: -item[1]):
        print(f"  {phase:<19}{us / 1e3 / steps:>10.1f} ms/step{100 * us / total_us:>7.1f}%")
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
