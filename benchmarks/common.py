"""What the benchmarks share: the real images, each method's benchmark settings, a method set up as the pipeline's
worker loop trains it (``Model``, whose ``train_step`` is ``ssl_core.training.TrainStep``), the training-step timer
and the Ray Train path (Parquet -> Ray Data -> on-device views -> DDP step).

Only ``ray_path_images_per_second`` imports Ray and the pipelines, so ``throughput.py --no-ray`` runs where Ray
is not installed. Images: the real 32x32 Tiny-ImageNet test set of ``../shared/datasets`` (no labels), resized
bilinearly for larger image sizes.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_core import build_method
from ssl_core.device import compile_or_eager, model_to_memory_format
from ssl_core.methods import MethodConfig, SSLMethod, method_config
from ssl_core.optim import build_optimizer, scaled_lr, warmup_cosine
from ssl_core.training import Objective, TrainStep

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
IMAGES_FILE = "tiny32_test_unlabeled.npz"

NUM_LOCAL_CROPS = 4  # DINO in the benchmarks: 2 global + 4 local crops (2x32 + 4x16 at 32 px, 2x96 + 4x48 at 96 px)
WEIGHT_DECAY = 1e-6
BASE_LR = 0.3  # x batch / 256, as the pretrain stage (LARS)


VIT_ONLY = frozenset({"mae", "ijepa", "maskfeat", "dinov2"})
"""Methods whose Config requires a ViT backbone."""


def backbone_for(method: str, backbone: str) -> str:
    """The ViT-only methods run with vit_tiny whatever ``backbone`` says."""
    return "vit_tiny" if method in VIT_ONLY else backbone


def method_settings(method: str, backbone: str, image_size: int,
                    num_local_crops: int | None = NUM_LOCAL_CROPS) -> dict[str, Any]:
    """The method config the benchmarks use: the paper defaults, with a 4096-key MoCo queue, 4096-dim DINO and
    DINOv2 outputs (DINOv2's iBOT patch head too: at 65536 its patch logits alone are batch x tokens x 65536
    floats, 2 GiB at batch 128 and 64 tokens) and ``num_local_crops`` DINO/DINOv2 local crops (None: the method's
    default), so the CPU runs stay short and fit in memory."""
    settings: dict[str, Any] = {"backbone": backbone_for(method, backbone), "image_size": image_size}
    if method == "moco":
        settings["queue_size"] = 4096
    if method in ("dino", "dinov2"):
        settings["out_dim"] = 4096
        if method == "dinov2":
            settings["patch_out_dim"] = 4096
        if num_local_crops is not None:
            settings["num_local_crops"] = num_local_crops
    return settings


@dataclasses.dataclass(frozen=True)
class Case:
    method: str
    backbone: str
    image_size: int
    batch_size: int

    def label(self, device: torch.device) -> str:
        return f"{self.method} {self.backbone} {self.image_size}px batch{self.batch_size} {device.type}"


@dataclasses.dataclass
class Model:
    """A method on ``device`` as the pipeline's worker loop trains it: channels_last where the device uses it,
    optionally compiled (``model``), and its optimizer at the peak learning rate ``lr``."""

    method: SSLMethod
    model: nn.Module  # the method, or its compiled wrapper
    optimizer: torch.optim.Optimizer
    lr: float
    device: torch.device

    def train_step(self, objective: Objective, total_steps: int,
                   after_step: Callable[[int, int], None] | None = None, precision: str = "auto") -> TrainStep:
        """The pipeline's step (``ssl_core.training.TrainStep``) of ``objective`` over ``total_steps``: cosine
        learning rate without warm-up (held at its end past ``total_steps``), then ``after_step(step,
        total_steps)`` (default: the method's EMA/queue update), under ``precision``'s autocast. No gradient
        clipping (the pretrain stage's default)."""
        after_step = after_step or self.method.on_after_optimizer_step

        def lr_at(step: int) -> float:
            return warmup_cosine(min(step, total_steps), total_steps=total_steps, warmup_steps=0, base_value=self.lr)

        return TrainStep(self.model, objective, self.optimizer, lr_at, device=self.device,
                         what=f"method {self.method.name}", precision=precision,
                         after_step=lambda step: after_step(min(step, total_steps - 1), total_steps=total_steps))

    def signature(self, train_step: TrainStep) -> tuple[int, str, str]:
        """(trainable parameters, optimizer class, resolved precision): what variants that claim to run the same
        model must share."""
        parameters = sum(p.numel() for p in self.method.parameters() if p.requires_grad)
        return parameters, type(self.optimizer).__name__, train_step.precision


def build_model(case: Case, device: torch.device, compile_model: bool = False,
                settings: MethodConfig | Mapping[str, Any] | None = None, optimizer: str = "lars",
                lr: float | None = None, weight_decay: float = WEIGHT_DECAY) -> Model:
    """``case``'s method (``settings``, default ``method_settings``) seeded with 0, with ``optimizer`` at ``lr``
    (default: LARS at ``BASE_LR`` x batch / 256)."""
    torch.manual_seed(0)
    settings = settings if settings is not None else method_settings(case.method, case.backbone, case.image_size)
    method = model_to_memory_format(build_method(case.method, settings).to(device), device)
    lr = lr if lr is not None else scaled_lr(BASE_LR, case.batch_size, "linear")
    return Model(method, compile_or_eager(method) if compile_model else method,
                 build_optimizer(method.param_groups(weight_decay), optimizer, lr, weight_decay), lr, device)


def load_images(count: int, image_size: int, datasets: Path = DATASETS) -> torch.Tensor:
    """The first ``count`` real images, uint8 (count, 3, image_size, image_size), repeated if the file has fewer."""
    images = np.load(datasets / IMAGES_FILE)["x"]
    if count > len(images):
        images = np.concatenate([images] * (count // len(images) + 1))
    tensor = torch.from_numpy(np.ascontiguousarray(images[:count])).permute(0, 3, 1, 2).contiguous()
    if image_size != tensor.shape[-1]:
        resized = F.interpolate(tensor.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                                align_corners=False)
        tensor = resized.round_().clamp_(0, 255).to(torch.uint8)
    return tensor


def device_synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step: Callable[[int], None], *, batch_size: int, warmup: int, steps: int,
                      device: torch.device) -> float:
    """Images/s of ``step(i)`` over ``steps`` calls after ``warmup`` untimed ones, synchronising the device only
    at the two ends of the timed window (the steps themselves must not synchronise)."""
    for index in range(warmup):
        step(index)
    device_synchronize(device)
    started = time.perf_counter()
    for index in range(warmup, warmup + steps):
        step(index)
    device_synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def timed_images_per_second(step: Callable[[int], None], first_index: int, *, batch_size: int, seconds: float,
                            device: torch.device, sync_every: int = 1) -> tuple[float, int]:
    """(images/s, steps) of ``step(first_index), step(first_index + 1), ...`` run until ``seconds`` have passed (a
    steady-state period: the caller warms up first). On CUDA the device is synchronised every ``sync_every`` steps
    (the clock is read there) and at the end."""
    device_synchronize(device)
    started = time.perf_counter()
    steps = 0
    while True:
        step(first_index + steps)
        steps += 1
        if steps % sync_every == 0:
            device_synchronize(device)
            if time.perf_counter() - started >= seconds:
                break
    device_synchronize(device)
    return steps * batch_size / (time.perf_counter() - started), steps


def start_ray(cpus: int, gpus: int) -> None:
    """A local Ray for the benchmarks, started as the CLI starts it (``pipelines.ray_train.init_ray``: workers at the
    driver's CPU priority, not Ray's default nice 15, which on a busy machine would slow the Ray path (b) against
    the variants that run in the benchmark's own process)."""
    from pipelines.ray_train import init_ray

    init_ray(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)


def default_cpus_per_worker(cpus: float, workers: int) -> float:
    """The machine's CPUs less 0.5 left to the Ray Data readers (0.25 CPU tasks), split between the workers."""
    return (cpus - 0.5) / workers


def ingest_images(rows: int, work_dir: Path, datasets: Path = DATASETS) -> Path:
    """A Parquet dataset (ingest output, all rows in the train split) of the first ``rows`` real 32x32 images;
    made once and reused."""
    from pipelines.datasets import MANIFEST_NAME
    from pipelines.stages.ingest import ingest

    data_path = work_dir / f"tiny32_{rows}"
    if not (data_path / MANIFEST_NAME).is_file():
        images = load_images(rows, 32, datasets).permute(0, 2, 3, 1).numpy()
        with tempfile.TemporaryDirectory() as directory:
            npz = Path(directory) / "tiny32.npz"
            np.savez(npz, x=images)
            ingest(str(npz), data_path, val_fraction=0.0)
    return data_path


@dataclasses.dataclass(frozen=True)
class RayPathRun:
    """One measurement of the pipelines' pretraining (``pipelines.pretraining.fit_pretraining`` on Ray Train)."""

    method: str
    backbone: str
    image_size: int
    batch_size: int  # per worker
    steps_per_epoch: int
    workers: int = 1
    cpus_per_worker: float = 1.0
    torch_threads: int = 0
    """The worker's torch intra-op threads (``scaling.torch_threads``; 0: floor of ``cpus_per_worker``)."""
    use_gpu: bool = False
    compile: bool = False
    precision: str = "auto"
    retain_freed_memory: bool = True
    """``scaling.retain_freed_memory`` (``pipelines.host_memory``)."""


def ray_path_images_per_second(run: RayPathRun, work_dir: Path, datasets: Path = DATASETS) -> float:
    """Images/s of the second of two epochs (the first pays start-up and compilation) of the real pretrain stage:
    Parquet read and decoded by Ray Data tasks, streamed to the workers, augmented on their device, DDP step.
    Needs a running ``ray.init()``. Nothing is logged to MLflow (no run id)."""
    from pipelines.config import config_from_mapping
    from pipelines.pretraining import fit_pretraining

    rows = run.batch_size * run.workers * run.steps_per_epoch
    data_path = ingest_images(rows, work_dir, datasets)
    config = config_from_mapping({
        "data": {"path": str(data_path), "image_size": run.image_size},
        # Every field spelled out, so that no recipe (ssl_core.recipes) fills one in: the same model as a, b', c.
        "method": {"name": run.method,
                   "config": {k: v for k, v in dataclasses.asdict(method_config(
                       run.method, method_settings(run.method, run.backbone, run.image_size))).items()
                              if k != "image_size"}},
        "scaling": {"num_workers": run.workers, "cpus_per_worker": run.cpus_per_worker,
                    "torch_threads": run.torch_threads, "use_gpu": run.use_gpu,
                    "retain_freed_memory": run.retain_freed_memory,
                    "storage_path": str(work_dir / "runs")},
        "pretrain": {"epochs": 2, "batch_size": run.batch_size, "optimizer": "lars", "lr": BASE_LR,
                     "lr_scaling": "linear", "weight_decay": WEIGHT_DECAY, "warmup_epochs": 0.5, "compile": run.compile,
                     "precision": run.precision},
        "finetune": {"head_layers": 0},  # not fine-tuned; DINO, MAE and the pretext methods have no projection head
    }, base=work_dir)
    name = f"bench-{run.method}-{run.backbone}-{run.image_size}px-{run.workers}w-{os.getpid()}-{time.time_ns()}"
    result = fit_pretraining(config, None, name, log_model=False)
    return float(result.return_value["metrics"]["images_per_second"])
