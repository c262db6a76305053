"""Every config that loads runs its first step: each shipped pipeline config (``pipelines/configs/*.yaml``) and every
registered method's defaults are loaded with ``config_from_mapping`` / ``load_config`` (every load-time check), then
take one real pretraining step on CPU, no Ray: the method built as the pretrain worker builds it, its views, its loss,
backward, the optimizer step and the after-step hook (EMA, queue, centering), as ``pipelines.train_loop`` runs them.

Kept faithful to each config: its method, backbone (a method's defaults: ResNet-18, or DINOv2's ViT-Tiny with
its 65536-way heads), heads and optimizer; a shipped config also keeps its image size and per-worker batch. Shrunk, for
a method's defaults only: the batch (4, not ``pretrain.batch_size`` 256) and the image size (16 px, not the default
32: the ViT then has 16 patches, not 64, and DINO's local crops are 8 px; 32 px took two minutes for all methods on
two shared cores, mostly DINOv2's per-patch iBOT head; the tile methods keep 32 px, their 3x3 tiles need it), through
the same code; and the training set (512 rows: what
a memory bank and PCL's 400 prototypes are sized for).

And the load-time rules that stop a config from crashing at that step, each naming both keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.config import CONFIG_DIR, PipelineConfig, config_from_mapping, load_config, machine_shortfall
from ssl_core import optim
from ssl_core.methods import METHODS, build_method
from ssl_core.training import TrainStep, ssl_objective

TRAIN_ROWS = 512
DEFAULTS_BATCH = 4
DEFAULTS_IMAGE_SIZE = 16


def _method_defaults(name: str) -> PipelineConfig:
    """The pipeline defaults with method ``name`` at its own defaults (fine-tuning keeps the head blocks it has)."""
    head_layers = min(1, METHODS.get(name).Config().max_finetune_head_layers())
    values = {"method": {"name": name}, "finetune": {"head_layers": head_layers}}
    try:
        return config_from_mapping({**values, "data": {"image_size": DEFAULTS_IMAGE_SIZE}})
    except ValueError:  # the tile methods' 3x3 tiles need the default 32 px
        return config_from_mapping(values)


CASES = {f"config:{path.name}": path for path in sorted(CONFIG_DIR.glob("*.yaml"))}
CASES.update({f"method:{name}": name for name in METHODS.names()})


def first_step(cfg: PipelineConfig, batch_size: int) -> float:
    """One pretraining step of ``cfg`` on ``batch_size`` random images; returns the loss."""
    p = cfg.pretrain
    method = build_method(cfg.method.name, cfg.method.config, train_rows=TRAIN_ROWS)
    device = torch.device("cpu")
    optimizer = optim.build_optimizer(method.param_groups(p.weight_decay), p.optimizer, p.lr, p.weight_decay)
    step = TrainStep(method, ssl_objective(method.view_generator(), device), optimizer, lambda _: p.lr, device=device,
                     what="first step", grad_clip=p.grad_clip,
                     after_step=lambda index: method.on_after_optimizer_step(index, 10))
    generator = torch.Generator().manual_seed(0)
    size = cfg.data.image_size
    batch = {"image": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator),
             "row_index": torch.arange(batch_size)}
    before = [parameter.detach().clone() for parameter in method.parameters() if parameter.requires_grad]
    out, _ = step(batch, 0, generator)
    step.guard.check()  # a non-finite loss raises here
    after = [parameter for parameter in method.parameters() if parameter.requires_grad]
    assert any(not torch.equal(old, new) for old, new in zip(before, after, strict=True)), "nothing was trained"
    return float(out.loss)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_config_that_loads_runs_its_first_step(case: str) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # two cores, shared with the rest of the suite
    source = CASES[case]
    if isinstance(source, Path):
        cfg = load_config(source)
        batch_size = cfg.pretrain.batch_size  # the shipped configs' own per-worker batch
    else:
        cfg = _method_defaults(source)
        batch_size = DEFAULTS_BATCH
    loss = first_step(cfg, batch_size)
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # MoCo's queue takes 2 x 64 x 2 = 256 keys a step: 128 would crash at the first enqueue.
        ({"method": {"name": "moco", "config": {"queue_size": 128}}, "pretrain": {"batch_size": 64},
          "scaling": {"num_workers": 2}},
         r"method\.config\.queue_size=128 is smaller than the 256 keys a step enqueues \(2 views x "
         r"pretrain\.batch_size=64 x 2 worker\(s\), scaling\.num_workers\)"),
        # A search that can pick a queue below the global batch is refused before any trial.
        ({"method": {"name": "moco"}, "pretrain": {"batch_size": 64, "warmup_epochs": 1},
          "tune": {"enabled": True, "epochs": 2, "bounds": {"queue_size": {"choice": [4096, 64]}}}},
         r"tune: the search can pick method\.config\.queue_size=64 .* method\.config\.queue_size=64 is smaller than "
         r"the 128 keys"),
        # A ViT cuts 72 px into 16 px patches: not whole.
        ({"method": {"name": "dino", "config": {"backbone": "vit_tiny"}}, "data": {"image_size": 72},
          "finetune": {"head_layers": 0}},
         r"data\.image_size=72 is not a multiple of 16, the patch size of method\.config\.backbone=vit_tiny"),
        ({"data": {"source": "builtin:digitz"}},
         r"data\.source='builtin:digitz' is not usable: unknown built-in source 'builtin:digitz'; known: "
         r"builtin:digits"),
        ({"data": {"source": "no/such/folder"}}, r"data\.source='no/such/folder' is not usable: .*does not exist"),
    ],
)
def test_configs_that_would_crash_mid_run_are_refused_at_load(tmp_path: Path, values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_mapping(values, base=tmp_path)


def test_the_same_configs_within_the_rules_load_and_run() -> None:
    """The boundary of the queue rule: exactly the keys of a step fit, and that step runs."""
    cfg = config_from_mapping({"method": {"name": "moco", "config": {"backbone": "resnet8", "queue_size": 16}},
                               "data": {"image_size": 16}, "pretrain": {"batch_size": 8}})
    assert cfg.method.config.queue_size == 2 * cfg.pretrain.batch_size
    assert torch.isfinite(torch.tensor(first_step(cfg, cfg.pretrain.batch_size)))
    vit = config_from_mapping({"method": {"name": "dino", "config": {"backbone": "vit_tiny", "encoder_depth": 1,
                                                                      "out_dim": 64, "hidden_dim": 32,
                                                                      "bottleneck_dim": 16}},
                               "data": {"image_size": 80}, "finetune": {"head_layers": 0}})
    assert vit.data.image_size == 80  # 5 x 16 px patches; local crops of 32 px: 2 x 2 patches


@pytest.mark.parametrize(
    ("scaling", "tune", "cpus", "gpus", "expected"),
    [
        ({"num_workers": 8}, {}, 2, 0,
         "scaling.num_workers=8 x scaling.cpus_per_worker=1 needs 8 CPUs, and this machine's Ray has 2"),
        ({"cpus_per_worker": 16}, {}, 2, 0,
         "scaling.num_workers=1 x scaling.cpus_per_worker=16 needs 16 CPUs, and this machine's Ray has 2"),
        ({"num_workers": 2, "use_gpu": True}, {}, 16, 1,
         "scaling.num_workers=2 x scaling.gpus_per_worker=1 needs 2 GPUs, and this machine's Ray has 1"),
        ({"num_workers": 2, "cpus_per_worker": 0.5}, {"enabled": True, "num_workers": 2, "cpus_per_worker": 1.0,
                                                      "epochs": 3}, 2, 0,
         "tune.num_workers=2 x tune.cpus_per_worker=1 needs 2.1 CPUs, and this machine's Ray has 2"),
        ({"num_workers": 2, "cpus_per_worker": 1.0}, {}, 2, 0, None),
        ({"num_workers": 0, "cpus_per_worker": 64}, {}, 2, 0, None),  # in-process: nothing reserved
    ],
)
def test_workers_the_machine_cannot_hold_are_named(scaling: dict, tune: dict, cpus: int, gpus: int,
                                                   expected: str | None) -> None:
    cfg = config_from_mapping({"scaling": scaling, "tune": tune, "pretrain": {"warmup_epochs": 1}})
    assert machine_shortfall(cfg, cpus, gpus) == expected
