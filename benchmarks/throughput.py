"""Images/s of a pretraining step, our paths against pre-made views and lightly, side by side in one process.

    python benchmarks/throughput.py                          # SimCLR ResNet-18 32x32 batch 256 (CPU: ~15 min)
    python benchmarks/throughput.py --methods simclr moco byol dino mae --sizes 32 96 --seconds 30 --rounds 3
    python benchmarks/throughput.py --no-ray                 # without Ray (e.g. a GPU machine without Ray's wheel)
    python benchmarks/throughput.py --no-ray --profile       # + torch.profiler of variant b': where a step goes
    python benchmarks/throughput.py --precision bf16         # every variant under bf16 autocast
    python benchmarks/throughput.py --threads 1              # 1 torch thread everywhere (the pipeline's on 2 cores)
    python benchmarks/throughput.py --malloc glibc           # glibc's malloc defaults everywhere, b's worker included

Timing: every variant is built and warmed up once, then timed for a steady-state period (``--seconds``, default 60
on CPU, 10 on CUDA) in interleaved rounds (a, b', c, b, a, b', c, b, ...; ``--rounds``, default 3), so that a change
of load on a shared machine hits all of them; the table gives each variant's median, min-max and half range, and the
ratios are of medians. a, b' and c are checked to run the same model (trainable parameter count), optimizer class and
precision (an assertion); b is built from the same method config, LARS settings and precision.

Memory allocator: every variant runs under the same glibc malloc settings, by default the pipeline's CPU workers'
(``--malloc retain``: ``pipelines.host_memory.RETAIN_ENV``, freed memory kept for the next step; the benchmark
restarts itself with them, and b's worker has them from ``scaling.retain_freed_memory``); ``--malloc glibc``:
glibc's defaults in all four (``scaling.retain_freed_memory: false`` for b), as a training loop of your own runs.

Variants (the same model, loss sizes and optimizer, LARS, in all four; channels_last; autocast per ``--precision``,
``auto``: bf16 on CUDA, fp32 on CPU):

  a   the pipeline's training step (ssl_core.training.TrainStep) over pre-made, already augmented views in device
      memory: the model's practical limit.
  b'  the pipeline's step without Ray: uint8 batches in (pinned) host memory -> non-blocking copy -> TrainStep of
      ssl_core.training.ssl_objective: on-device views -> the method's training_step -> backward -> LARS ->
      EMA/queue update (exactly what the worker loop of pipelines/train_loop.py runs per batch).
  b   the pipelines' pretraining on Ray Train (1 worker): Parquet -> Ray Data read/decode tasks -> streamed
      batches -> on-device views -> step; images/s of its second epoch, as the worker loop reports it (the first
      epoch is the warm-up). Ray's own overhead is b/b'. On a CPU its worker runs as many torch threads as a, b'
      and c (``scaling.torch_threads``): by ``floor(cpus_per_worker)`` it would get one core of two here.
  c   lightly's data path and loss (lightly_loop.py): lightly's transforms (PIL, per image) in a torch DataLoader
      with one worker per CPU core, lightly's loss (NTXentLoss, NTXentLoss with a memory bank for MoCo,
      NegativeCosineSimilarity, DINOLoss) and lightly's momentum update, on the same backbone, heads and TrainStep.
      MAE has no lightly loss (lightly's example uses torch's MSE): c runs our MAE step on lightly's MAETransform.

Augmentation recipes match across b/b' and c (at < 64 px, no blur, as the papers' CIFAR recipes). DINO uses 2 global
and 4 local crops (2x32 + 4x16 at 32 px); MAE runs on vit_tiny. Images: real Tiny-ImageNet 32x32
(``--datasets``, default ../shared/datasets), resized for larger sizes. Prints the medians and, last, one machine-readable line per case, e.g.
``simclr resnet18 32px batch256 cpu: b/a=0.93 b/c=1.41 b'/a=0.95 b'/c=1.44 b/b'=0.98``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DATASETS,
    IMAGES_FILE,
    REPO,
    Case,
    RayPathRun,
    backbone_for,
    build_model,
    default_cpus_per_worker,
    load_images,
    ray_path_images_per_second,
    start_ray,
    timed_images_per_second,
)
from lightly_loop import lightly_variant  # noqa: E402

from pipelines.host_memory import malloc_environment  # noqa: E402
from ssl_core.device import views_to_memory_format  # noqa: E402
from ssl_core.methods import StepOutput  # noqa: E402
from ssl_core.training import PRECISIONS, ssl_objective  # noqa: E402

VARIANTS = ("a", "b'", "b", "c")
POOL_BATCHES = 2  # distinct batches cycled through by a and b'


def host_batches(case: Case, device: torch.device, count: int, datasets: Path) -> list[Tensor]:
    """``count`` uint8 batches of real images (from ``datasets``) in host memory, pinned when the device is CUDA."""
    images = load_images(count * case.batch_size, case.image_size, datasets)
    if device.type == "cuda":
        images = images.pin_memory()
    return list(images.split(case.batch_size))


def premade_views_objective(model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> StepOutput:
    """a's objective: the batch already holds the method's views (on the device, channels_last), so the step is
    ``ssl_objective``'s without the augmentation."""
    return model(batch)


@dataclasses.dataclass
class Prepared:
    """A variant ready to time: ``step(i)`` runs step ``i``; ``signature``: (trainable parameters, optimizer class,
    precision), which a, b' and c must share; ``close()`` frees what it holds."""

    step: Callable[[int], None]
    signature: tuple[int, str, str]
    close: Callable[[], None] = lambda: None


def prepare_bare(case: Case, device: torch.device, total: int, compile_model: bool, precision: str,
                 datasets: Path) -> Prepared:
    """a: pre-made views in device memory (augmented once, outside the timing), the pipeline's TrainStep."""
    m = build_model(case, device, compile_model)
    generator = torch.Generator().manual_seed(0)
    views = m.method.view_generator()
    pool = [views_to_memory_format(views(batch.to(device), generator), device)
            for batch in host_batches(case, device, POOL_BATCHES, datasets)]
    train_step = m.train_step(premade_views_objective, total, precision=precision)
    return Prepared(lambda i: train_step(pool[i % len(pool)], i, generator), m.signature(train_step))


def unlabelled(name: str, fn: Callable) -> Callable:
    return fn


def ours_step_fn(case: Case, device: torch.device, total: int, compile_model: bool, datasets: Path,
                 label: Callable[[str, Callable], Callable] = unlabelled, precision: str = "auto") -> Prepared:
    """b': host uint8 batch -> non-blocking copy -> the pipeline's TrainStep of ``ssl_objective`` (on-device views,
    the method's training_step, backward, LARS, EMA/queue update). ``label(phase, fn)`` wraps the copy, the views,
    the model's forward and the whole step (the profiler's phases)."""
    m = build_model(case, device, compile_model)
    generator = torch.Generator().manual_seed(0)
    batches = host_batches(case, device, POOL_BATCHES, datasets)
    objective = ssl_objective(label("augment", m.method.view_generator()), device)
    m.model = label("forward", m.model)
    train_step = m.train_step(objective, total, precision=precision)
    signature = m.signature(train_step)
    train_step = label("step", train_step)
    copy = label("copy", lambda i: batches[i % len(batches)].to(device, non_blocking=True))

    def step(i: int) -> None:
        train_step({"image": copy(i)}, i, generator)

    return Prepared(step, signature)


def prepare_ours(case: Case, device: torch.device, total: int, compile_model: bool, precision: str,
                 datasets: Path) -> Prepared:
    """b'. On CUDA one step runs under ``torch.cuda.set_sync_debug_mode("warn")`` and the host-device
    synchronisations it reports (there should be none) are printed."""
    prepared = ours_step_fn(case, device, total, compile_model, datasets, precision=precision)
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                prepared.step(0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        print(f"  {case.label(device)}  b' host-device synchronisations in one step: {len(syncs)}"
              + (f" (first: {syncs[0].splitlines()[0]})" if syncs else ""), flush=True)
    return prepared


def prepare_lightly(case: Case, device: torch.device, total: int, compile_model: bool, precision: str,
                    datasets: Path) -> Prepared:
    """c (lightly_loop.py)."""
    variant = lightly_variant(case, device, compile_model, total, precision, datasets=datasets)
    return Prepared(variant.step, variant.model.signature(variant.train_step), variant.close)


# ------------------------------------------------------------------------------------------------------- profile

def profile_ours(case: Case, device: torch.device, steps: int, compile_model: bool, datasets: Path,
                 rows: int = 15) -> None:
    """torch.profiler over ``steps`` steps of b' (after one warm-up). Phases: copy; augment and forward (inside the
    TrainStep); backward+optimizer = the rest of the TrainStep (zero_grad, backward, LARS, EMA/queue update)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def label(phase: str, fn: Callable) -> Callable:
        def labelled(*args):
            with record_function(f"phase:{phase}"):
                return fn(*args)

        return labelled

    step = ours_step_fn(case, device, steps + 1, compile_model, datasets, label).step
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


def restart_with_malloc(mode: str) -> None:
    """Replace this process by the same command under ``mode``'s malloc settings (glibc reads them at start) unless it
    already runs under them: ``retain``: ``RETAIN_ENV``; ``glibc``: no ``MALLOC_*`` variable."""
    env = malloc_environment(mode == "retain")
    if env != dict(os.environ):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


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


def spread(values: list[float]) -> str:
    """``median [min-max] (+-half range as % of the median)``."""
    median = statistics.median(values)
    half = (max(values) - min(values)) / 2
    return f"{median:.1f} [{min(values):.1f}-{max(values):.1f}] (+-{100 * half / median:.0f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["simclr"],
                        help="simclr moco byol dino mae (default: simclr)")
    parser.add_argument("--backbone", default="resnet18", help="CNN backbone (MAE always uses vit_tiny)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32], help="image sizes, e.g. 32 96")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=None,
                        help="steady-state seconds per variant per round (default: 60 on CPU, 10 on CUDA)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (a, b', c, b, a, b', ...)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per variant, once (default: 2 CPU, 10 CUDA)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="autocast of every variant's step")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="any of a b' b c (b' may be written bp)")
    parser.add_argument("--no-ray", action="store_true", help="skip b (Ray Train): a, b' and c only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every variant, b's worker included (default: torch's, one per core)")
    parser.add_argument("--malloc", choices=("retain", "glibc"), default="retain",
                        help="malloc settings of every variant: the pipeline workers' (retain) or glibc's defaults")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (eager fallback) in all variants")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--profile", action="store_true", help="also run torch.profiler over b' and print where a step goes")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench_runs" / "throughput")
    parser.add_argument("--datasets", type=Path, default=DATASETS,
                        help=f"the folder holding {IMAGES_FILE} (default: ../shared/datasets)")
    args = parser.parse_args()
    restart_with_malloc(args.malloc)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    seconds = args.seconds or (10.0 if cuda else 60.0)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    variants = parse_variants(args.variants)
    if args.no_ray:
        variants = [v for v in variants if v != "b"]
    if not (args.datasets / IMAGES_FILE).is_file():
        raise SystemExit(f"missing {args.datasets / IMAGES_FILE} (see ../shared/datasets/README.md)")
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
    print(f"variants {' '.join(variants)}, interleaved over {args.rounds} rounds of {seconds:g} s each (after "
          f"{warmup} warm-up steps per variant); precision {args.precision}; compile={args.compile}; malloc "
          f"{args.malloc}", flush=True)

    preparers = {"a": prepare_bare, "b'": prepare_ours, "c": prepare_lightly}
    schedule_steps = 1_000_000  # the learning rate stays near its peak: speed, not learning, is measured
    results: list[tuple[Case, dict[str, list[float]]]] = []
    ray_started = False
    for case in cases:
        prepared = {v: preparers[v](case, device, schedule_steps, args.compile, args.precision, args.datasets)
                    for v in variants if v != "b"}
        signatures = {v: p.signature for v, p in prepared.items()}
        # a, b' and c must run the same model, heads, optimizer and precision, or their ratio means nothing.
        assert len(set(signatures.values())) <= 1, \
            f"variants differ in (parameters, optimizer, precision): {signatures}"
        if signatures:
            parameters, optimizer, precision = next(iter(signatures.values()))
            ray_note = "; b builds the same method config, LARS and precision in Ray Train" if "b" in variants else ""
            print(f"  {case.label(device)}: {parameters:,} trainable parameters, {optimizer}, {precision} in "
                  f"{', '.join(signatures)}{ray_note}", flush=True)
        for variant, p in prepared.items():
            for index in range(warmup):
                p.step(index)
        next_index = {v: warmup for v in prepared}
        values: dict[str, list[float]] = {v: [] for v in variants}
        for round_index in range(args.rounds):
            for variant in variants:
                if variant == "b":
                    if not ray_started:
                        start_ray(os.cpu_count() or 2, 1 if cuda else 0)
                        ray_started = True
                    pace = statistics.median(values.get("b'") or values.get("a") or [100.0])
                    run = RayPathRun(case.method, case.backbone, case.image_size, case.batch_size,
                                     steps_per_epoch=max(2, math.ceil(seconds * pace / case.batch_size)),
                                     cpus_per_worker=(1.0 if cuda else default_cpus_per_worker(os.cpu_count() or 2, 1)),
                                     torch_threads=0 if cuda else torch.get_num_threads(),
                                     use_gpu=cuda, compile=args.compile, precision=args.precision,
                                     retain_freed_memory=args.malloc == "retain")
                    rate = ray_path_images_per_second(run, args.work_dir, args.datasets)
                    steps = run.steps_per_epoch
                else:
                    rate, steps = timed_images_per_second(prepared[variant].step, next_index[variant],
                                                          batch_size=case.batch_size, seconds=seconds, device=device,
                                                          sync_every=10 if cuda else 1)
                    next_index[variant] += steps
                values[variant].append(rate)
                print(f"  round {round_index + 1}/{args.rounds}  {case.label(device)}  {variant:<3}{rate:>10.1f} "
                      f"images/s ({steps} steps)", flush=True)
        for p in prepared.values():
            p.close()
        del prepared
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        results.append((case, values))
        if args.profile:
            profile_ours(case, device, args.profile_steps, args.compile, args.datasets)
    if ray_started:
        import ray

        ray.shutdown()

    print(f"\nimages/s per variant: median [min-max] (+-half range) over {args.rounds} interleaved rounds of "
          f"{seconds:g} s")
    for case, values in results:
        print(f"{case.label(device)}")
        for variant in variants:
            print(f"  {variant:<3}{spread(values[variant])}")
    print()
    for case, values in results:
        medians = {v: statistics.median(values[v]) for v in variants}
        parts = [f"{t}/{b}={ratio(medians, t, b)}" for t, b in RATIOS if t in variants and b in variants]
        parts = parts or [f"{v}={medians[v]:.1f}img/s" for v in variants]  # a single variant: no ratio
        print(f"{case.label(device)}: {' '.join(parts)}", flush=True)


if __name__ == "__main__":
    main()
