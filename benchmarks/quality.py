"""What pretraining learns on real data: Fashion-MNIST train (labels ignored) pretrained for a wall-time budget,
then weighted kNN top-1 on its test split, against a randomly initialised encoder and raw pixels.

    python benchmarks/quality.py [--budget-minutes 20] [--method simclr] [--backbone resnet20] [--workers 1]

Reads ../shared/datasets/fashion_mnist_{train,test}.npz (see its README for the raw-pixel floors: 1-NN 0.850,
20-NN 0.841). The number of epochs is set from a short throughput calibration so that pretraining fits the
budget; the learning-rate schedule spans exactly those epochs. Tracking goes to <work-dir>/mlflow.db.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, REPO, Case, build_model, images_per_second  # noqa: E402


def build_npz(datasets: Path, out: Path) -> Path:
    train = np.load(datasets / "fashion_mnist_train.npz")
    test = np.load(datasets / "fashion_mnist_test.npz")
    path = out / "fashion_mnist.npz"
    np.savez(path, x=train["x"], y=train["y"], x_test=test["x"], y_test=test["y"])
    return path


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    from ssl_core.evaluate import knn_accuracy

    return knn_accuracy(bank, bank_labels, queries, labels, num_classes=10, k=k, temperature=0.07)["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=20.0)
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.004)
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench_runs" / "quality")
    args = parser.parse_args()

    import ray

    from pipelines import tracking
    from pipelines.config import config_from_mapping
    from pipelines.datasets import MANIFEST_NAME, load_split_tensors, read_manifest
    from pipelines.pretraining import fit_pretraining
    from pipelines.ray_train import init_ray
    from pipelines.stages.ingest import ingest
    from ssl_core import build_backbone
    from ssl_core.evaluate import extract_features
    from ssl_core.training import ssl_objective

    args.work_dir.mkdir(parents=True, exist_ok=True)
    data_path = args.work_dir / "fashion_mnist"
    if not (data_path / MANIFEST_NAME).is_file():
        with tempfile.TemporaryDirectory() as directory:
            ingest(str(build_npz(args.datasets, Path(directory))), data_path, val_fraction=0.02)
    method_config = {"backbone": args.backbone, "projection_hidden_dim": 512, "projection_dim": 128}
    values = {
        "data": {"path": str(data_path), "image_size": args.image_size},
        "method": {"name": args.method, "config": method_config},
        "scaling": {"num_workers": args.workers, "cpus_per_worker": 2 / args.workers if args.workers > 1 else 1.5,
                    "storage_path": str(args.work_dir / "runs")},
        "pretrain": {"epochs": 1, "batch_size": args.batch_size, "optimizer": "adamw", "lr": args.lr,
                     "lr_scaling": "none", "weight_decay": 1e-4, "warmup_epochs": 0.2, "knn_every": 1000,
                     "knn_bank_size": 5000, "log_every_steps": 20},
    }

    # Calibrate: images/s of a few of the pipeline's training steps in this process, to size the epochs to the budget.
    config = config_from_mapping(values, base=args.work_dir)
    cpu = torch.device("cpu")
    pretrain = values["pretrain"]
    m = build_model(Case(args.method, args.backbone, args.image_size, args.batch_size), cpu,
                    settings=config.method.config, optimizer="adamw", lr=args.lr, weight_decay=pretrain["weight_decay"])
    train_step = m.train_step(ssl_objective(m.method.view_generator(), cpu), total_steps=3)
    batch = {"image": torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)}
    generator = torch.Generator().manual_seed(0)
    rate = images_per_second(lambda step: train_step(batch, step, generator), batch_size=args.batch_size, warmup=0,
                             steps=3, device=cpu)
    train_rows = read_manifest(data_path)["splits"]["train"]["rows"]
    epochs = max(1, math.floor(args.budget_minutes * 60 * rate * 0.9 / train_rows))
    pretrain["epochs"] = epochs
    pretrain["knn_every"] = epochs
    config = config_from_mapping(values, base=args.work_dir)
    print(f"calibration: {rate:.0f} images/s -> {epochs} epochs in a {args.budget_minutes:.0f}-minute budget", flush=True)

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=True)  # as the CLI: workers at nice 0
    started = time.perf_counter()
    with tracking.run(config.tracking, "quality-benchmark", {tracking.STAGE_TAG: "benchmark"},
                      params=config.to_dict()) as run_id:
        outcome = fit_pretraining(config, run_id, f"quality-{run_id}").return_value
    pretrain_minutes = (time.perf_counter() - started) / 60
    ray.shutdown()

    encoder = tracking.load_torch_model(config.tracking, outcome["encoder_uri"])
    normalize = m.method.normalization()
    bank_images, bank_labels = load_split_tensors(data_path, "train", args.image_size)
    test_images, test_labels = load_split_tensors(data_path, "test", args.image_size)
    torch.manual_seed(0)
    random_encoder = build_backbone(args.backbone, small_images=True, image_size=args.image_size)
    rows = []
    for name, model in (("SSL " + args.method, encoder), ("random init", random_encoder)):
        bank = extract_features(model, bank_images, normalize=normalize)
        queries = extract_features(model, test_images, normalize=normalize)
        rows.append((name, knn_top1(bank, bank_labels, queries, test_labels, 1),
                     knn_top1(bank, bank_labels, queries, test_labels, 20)))
    raw_bank = F.normalize(bank_images.flatten(1).float(), dim=1)
    raw_queries = F.normalize(test_images.flatten(1).float(), dim=1)
    rows.append(("raw pixels", knn_top1(raw_bank, bank_labels, raw_queries, test_labels, 1),
                 knn_top1(raw_bank, bank_labels, raw_queries, test_labels, 20)))

    print(f"\nFashion-MNIST, {args.backbone} {args.method}, {epochs} epochs, batch {args.batch_size}, "
          f"{args.workers} worker(s), pretraining {pretrain_minutes:.1f} min on {torch.get_num_threads()} CPU threads")
    print(f"{'encoder':<16}{'1-NN':>8}{'20-NN':>8}   (kNN top-1 on the 10000 test images)")
    for name, one, twenty in rows:
        print(f"{name:<16}{one:>8.4f}{twenty:>8.4f}")
    print("README floor (raw pixels): 1-NN 0.850, 20-NN 0.841")


if __name__ == "__main__":
    main()
