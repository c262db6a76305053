"""Variant c of ``throughput.py``: lightly's data path and losses on our model, optimizer and training step.

lightly's transforms (PIL, per image) run in a torch DataLoader with one worker per CPU core; the loss is lightly's
(NTXentLoss, NTXentLoss with a memory bank for MoCo, NegativeCosineSimilarity, DINOLoss) and so is the momentum
update, on the same backbone and heads as the other variants, stepped by the same ``ssl_core.training.TrainStep``
(so c differs from b' in the data path and the loss only). MAE has no lightly loss (lightly's example uses torch's
MSE): c runs our MAE step on lightly's MAETransform data path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from common import DATASETS, Case, Model, build_model, load_images, method_settings
from ssl_core.device import views_to_memory_format
from ssl_core.methods import StepOutput
from ssl_core.training import TrainStep
from ssl_core.views import is_small_image, local_crop_size


def lightly_transform(method: str, image_size: int):
    """lightly's transform for ``method`` with the recipe of our method's ``view_generator()`` (``ssl_core.views``)."""
    from lightly import transforms as T

    small = is_small_image(image_size)
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


def no_update(step: int, total_steps: int) -> None:
    """Methods without a momentum teacher: nothing after the optimizer step."""


def lightly_loss_fn(m: Model) -> tuple[Callable[[list[Tensor]], Tensor], Callable[[int, int], None]]:
    """(loss of a list of views, update after the optimizer step) in lightly's terms, on our method's modules."""
    from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss
    from lightly.models.utils import update_momentum

    method, config = m.method, m.method.config
    device = next(method.parameters()).device

    def momentum_update(step: int, total_steps: int) -> None:
        momentum = method.momentum_at(step, total_steps)
        for online, teacher in method.ema_pairs():
            update_momentum(online, teacher, momentum)

    if method.name == "simclr":
        criterion = NTXentLoss(temperature=config.temperature).to(device)

        def loss(views: list[Tensor]) -> Tensor:
            z0, z1 = method.projection_head(method.encoder(torch.cat(views))).float().chunk(2)
            return criterion(z0, z1)

        return loss, no_update
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
        return lambda views: method.training_step({"view1": views[0]}).loss, no_update
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


@dataclasses.dataclass
class LightlyVariant:
    """c, prepared: ``step(i)`` takes the next batch of lightly's views from the DataLoader (cycling through
    ``pool_batches`` batches of real images) and runs the pipeline's TrainStep of lightly's loss. ``close()`` stops
    the DataLoader workers."""

    step: Callable[[int], None]
    model: Model
    train_step: TrainStep
    close: Callable[[], None]


def lightly_variant(case: Case, device: torch.device, compile_model: bool, total_steps: int, precision: str = "auto",
                    pool_batches: int = 8, datasets: Path = DATASETS) -> LightlyVariant:
    """c: lightly transforms in DataLoader workers (one per core), lightly's loss on the same model and optimizer;
    the images come from ``datasets`` (``common.load_images``)."""
    m = build_model(case, device, compile_model)
    loss_fn, after_step = lightly_loss_fn(m)

    def objective(model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> StepOutput:
        """The batch already holds lightly's views, in order; ``model`` is bypassed for lightly's loss."""
        return StepOutput(loss_fn(list(batch.values())), {})

    train_step = m.train_step(objective, total_steps, after_step, precision)
    dataset = PILImages(load_images(pool_batches * case.batch_size, case.image_size, datasets),
                        lightly_transform(case.method, case.image_size))
    workers = os.cpu_count() or 1
    loader = torch.utils.data.DataLoader(dataset, batch_size=case.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=True,
                                         pin_memory=device.type == "cuda")
    batches = [iter(loader)]
    generator = torch.Generator().manual_seed(0)  # unused: lightly's transforms draw in the DataLoader workers

    def next_views() -> list[Tensor]:
        try:
            return next(batches[0])
        except StopIteration:
            batches[0] = iter(loader)
            return next(batches[0])

    def step(i: int) -> None:
        views = {str(k): v.to(device, non_blocking=True) for k, v in enumerate(next_views())}
        train_step(views_to_memory_format(views, device), i, generator)

    def close() -> None:
        batches.clear()
        loader._iterator = None  # shuts the persistent workers down with the iterator

    return LightlyVariant(step, m, train_step, close)
