"""Semi-supervised fine-tuning on real data: Fashion-MNIST at 1% and 10% labels, every ``finetune.semi`` algorithm
from the same pretrained encoder, over several seeds; test top-1 mean and spread per algorithm and fraction.

    python benchmarks/semisup.py [--image-size 16] [--pool-rows 5000] [--steps 600] [--batch-size 8]
                                 [--seeds 0 1 2] [--fractions 0.01 0.1] [--algorithms none fixmatch ...]

The defaults are a small, quick scale (16 px, the 300-step encoder, 600 steps), where no algorithm separates from
``none``. The scale of the README's table is ``--image-size 28 --pool-rows 10000 --pretrain-steps 1000 --steps 3000
--batch-size 16 --algorithms none fixmatch``: under 4 minutes for the encoder, 10-11.5 CPU-minutes per FixMatch
fine-tune and 0.7-0.9 per ``none`` fine-tune, single-threaded on a 2-core CPU (run one process per ``--fractions``
value, each with its own ``--work-dir`` holding a copy of the cached encoder, to use both cores).

One process, plain PyTorch (no Ray, no MLflow): the fine-tune stage's objective (``ssl_core.semi.SemiObjective``,
or cross-entropy on the labeled rows for ``none``) through ``ssl_core.training.TrainStep``, as the stage's workers
run it. Data: ``../shared/datasets/fashion_mnist_{train,test}.npz``, a seeded subset of ``--pool-rows`` train
images (the unlabeled pool; the labeled rows are a class-stratified, seeded fraction of it, as the pipeline draws
them) and ``--test-rows`` test images, resized to ``--image-size``. The encoder (SimCLR, ResNet-8, 3-layer head)
is pretrained once on the pool for ``--pretrain-steps`` and cached under ``--work-dir``; every fine-tune keeps its
first head layer (SimCLRv2) and runs ``--steps`` steps of SGD (Nesterov momentum 0.9, ``--weight-decay``, cosine
learning rate from ``--lr``; labeled batch ``--batch-size``, unlabeled ``--unlabeled-ratio`` times as many), and is
evaluated through an EMA of its weights (``--eval-ema``, as FixMatch evaluates). ``none`` gets exactly the same
steps, labeled batches, weak view of the labeled batch, optimizer and EMA evaluation: only the unlabeled term
differs. References per fraction: a linear probe and a 20-NN on the frozen features of the same labeled rows. Runs
are interleaved (seed, fraction, algorithm) so machine load spreads over all of them; the results JSON is rewritten
after every run, so an interrupted benchmark keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.datasets import stratified_subset  # noqa: E402
from ssl_core.classifier import classifier_from_method, top1_accuracy  # noqa: E402
from ssl_core.ema import ema_update, frozen_copy  # noqa: E402
from ssl_core.evaluate import extract_features, knn_accuracy, linear_probe  # noqa: E402
from ssl_core.methods import StepOutput, build_method  # noqa: E402
from ssl_core.optim import build_optimizer, param_groups, warmup_cosine  # noqa: E402
from ssl_core.semi import ALGORITHMS, SemiConfig, SemiObjective, UnlabeledPool, semi_views  # noqa: E402
from ssl_core.semi.propagation import propagated_labels  # noqa: E402
from ssl_core.semi.rotation import trained_classifier, training_model  # noqa: E402
from ssl_core.training import TrainStep, ssl_objective  # noqa: E402

DATASETS = REPO.parent / "shared" / "datasets"
NUM_CLASSES = 10
METHOD = {"backbone": "resnet8", "projection_layers": 3, "projection_hidden_dim": 128, "projection_dim": 64,
          "temperature": 0.2}


def load_images(path: Path, rows: int, seed: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded subset of ``rows`` images of an npz, as uint8 (rows, 3, S, S) and int64 labels."""
    data = np.load(path)
    order = np.random.default_rng(seed).permutation(len(data["y"]))[:rows]
    images = torch.from_numpy(data["x"][order]).float().unsqueeze(1) / 255.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(data["y"][order]).long()


def pretrain(images: torch.Tensor, image_size: int, steps: int, batch_size: int, path: Path) -> dict:
    """SimCLR on ``images`` (labels unused) for ``steps``; the state dict, cached at ``path``."""
    if path.is_file():
        print(f"encoder: cached {path}", flush=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    method = build_method("simclr", {**METHOD, "image_size": image_size})
    optimizer = build_optimizer(param_groups(method, 1e-4), "adamw", 2e-3, 1e-4)
    step = TrainStep(method, ssl_objective(method.view_generator(), torch.device("cpu")), optimizer,
                     lambda s: warmup_cosine(s, total_steps=steps, warmup_steps=steps // 10, base_value=2e-3,
                                             final_value=0.0), device=torch.device("cpu"), what="simclr")
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for index in range(steps):
        rows = torch.randint(len(images), (batch_size,), generator=generator)
        out, _ = step({"image": images[rows]}, index, generator)
        if (index + 1) % 50 == 0:
            print(f"pretrain step {index + 1}/{steps} loss {out.loss.item():.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    step.guard.check()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(method.state_dict(), path)
    return method.state_dict()


def pretrained_classifier(state: dict, image_size: int):
    method = build_method("simclr", {**METHOD, "image_size": image_size})
    method.load_state_dict(state)
    return classifier_from_method(method, 1, NUM_CLASSES)


def finetune(algorithm: str, state: dict, pool: torch.Tensor, pool_labels: torch.Tensor, labeled: torch.Tensor,
             test: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace, seed: int) -> tuple[float, float]:
    """One fine-tune of the pretrained classifier: the test top-1 of its EMA copy (of the model itself when
    ``--eval-ema`` is 0) and the mean ``mask_rate`` of the last 10% of the steps (NaN where the algorithm logs
    none)."""
    torch.manual_seed(seed)
    model = pretrained_classifier(state, args.image_size)
    device = torch.device("cpu")
    labels_seen = torch.full_like(pool_labels, -1)
    labels_seen[labeled] = pool_labels[labeled]
    batch = min(args.batch_size, len(labeled))
    semi = SemiConfig(algorithm=algorithm, unlabeled_ratio=args.unlabeled_ratio, unlabeled_rows=len(pool),
                      threshold=args.threshold, strong_magnitude=args.strong_magnitude, cutout=args.cutout)
    weak, strong = semi_views(args.image_size, model.normalization(), semi, device)
    if algorithm == "none":
        def objective(wrapped, data, generator):
            return StepOutput(F.cross_entropy(wrapped(weak(data["image"], generator)).float(), data["label"]))
        hooks = None
    else:
        pool_set = UnlabeledPool(pool, labels_seen)
        propagated = None
        if algorithm == "label_propagation":
            features = extract_features(model.encoder, pool, device=device, normalize=model.normalization())
            propagated = propagated_labels(features, labels_seen, NUM_CLASSES, k=semi.propagation_k,
                                           alpha=semi.propagation_alpha, gamma=semi.propagation_gamma,
                                           iterations=semi.propagation_iterations)
        objective = SemiObjective(semi, pool_set, NUM_CLASSES, (weak, strong), device=device, total_steps=args.steps,
                                  steps_per_epoch=args.steps, propagated=propagated)
        hooks = objective
    trained = training_model(model, semi)  # remixmatch's rotation head, as the fine-tune stage trains it
    optimizer = build_optimizer(param_groups(trained, args.weight_decay), "sgd", args.lr, args.weight_decay)
    averaged = frozen_copy(trained)

    def after_step(index: int) -> None:
        if hooks is not None:
            hooks.after_step(index, args.steps)
        ema_update(trained, averaged, args.eval_ema)

    step = TrainStep(trained, objective, optimizer,
                     lambda s: warmup_cosine(s, total_steps=args.steps, warmup_steps=0, base_value=args.lr,
                                             final_value=0.0),
                     device=device, what=algorithm, after_step=after_step)
    generator = torch.Generator().manual_seed(seed * 7919 + 1)
    mask_rates = []
    for index in range(args.steps):
        rows = labeled[torch.randint(len(labeled), (batch,), generator=generator)]
        out, _ = step({"image": pool[rows], "label": pool_labels[rows]}, index, generator)
        if index >= args.steps - max(1, args.steps // 10) and "mask_rate" in out.logs:
            mask_rates.append(float(out.logs["mask_rate"]))
    step.guard.check()
    mask_rate = statistics.mean(mask_rates) if mask_rates else float("nan")
    evaluated = trained_classifier(averaged if args.eval_ema > 0 else trained)
    return top1_accuracy(evaluated, test[0], test[1], device), mask_rate


def references(state: dict, pool: torch.Tensor, pool_labels: torch.Tensor, labeled: torch.Tensor,
               test: tuple[torch.Tensor, torch.Tensor], image_size: int) -> dict[str, float]:
    """Linear probe and 20-NN on the frozen encoder's features of the labeled rows."""
    model = pretrained_classifier(state, image_size)
    normalization = model.normalization()
    bank = extract_features(model.encoder, pool[labeled], device="cpu", normalize=normalization)
    queries = extract_features(model.encoder, test[0], device="cpu", normalize=normalization)
    knn = knn_accuracy(bank, pool_labels[labeled], queries, test[1], num_classes=NUM_CLASSES,
                       k=min(20, len(labeled)), temperature=0.07)["top1"]
    probe = linear_probe(bank, pool_labels[labeled], queries, test[1], num_classes=NUM_CLASSES, epochs=100,
                         lr=0.01, device="cpu")["top1"]
    return {"linear_probe_frozen": probe, "knn20_frozen": knn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-rows", type=int, default=5000)
    parser.add_argument("--test-rows", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--unlabeled-ratio", type=int, default=7, help="mu [FixMatch: 7]")
    parser.add_argument("--lr", type=float, default=0.03, help="[FixMatch: 0.03]")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="[FixMatch: 5e-4 on CIFAR-10]")
    parser.add_argument("--eval-ema", type=float, default=0.99,
                        help="EMA momentum of the evaluated weights, 0 = evaluate the model itself [FixMatch: 0.999 "
                             "over 2^20 steps; 0.99 suits a few hundred steps, where 0.999 would still weigh the "
                             "initial weights by 0.999^600 = 0.55]")
    parser.add_argument("--strong-magnitude", type=float, default=1.0)
    parser.add_argument("--cutout", type=float, default=0.5, help="cutout side / image side [FixMatch: 0.5]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.95,
                        help="confidence threshold of pseudo_label / fixmatch / uda (papers: 0.95 / 0.95 / 0.8)")
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench_runs" / "semisup")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pool, pool_labels = load_images(args.datasets / "fashion_mnist_train.npz", args.pool_rows, 0, args.image_size)
    test = load_images(args.datasets / "fashion_mnist_test.npz", args.test_rows, 1, args.image_size)
    encoder_file = args.work_dir / (f"simclr-resnet8-{args.image_size}px-{args.pool_rows}rows-"
                                    f"{args.pretrain_steps}steps.pt")
    state = pretrain(pool, args.image_size, args.pretrain_steps, args.pretrain_batch_size, encoder_file)
    results: dict[str, dict[str, list[float]]] = {}
    mask_rates: dict[str, dict[str, list[float]]] = {}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results_file = args.work_dir / (f"results-{'+'.join(args.algorithms)}-{args.image_size}px-{args.steps}steps-"
                                    f"magnitude{args.strong_magnitude:g}-cutout{args.cutout:g}.json")
    for seed in args.seeds:
        for fraction in args.fractions:
            keys = list(range(len(pool_labels)))
            labeled = torch.tensor(stratified_subset(keys, pool_labels.tolist(), fraction, seed=seed, stream=10,
                                                     leave_one_out=False))
            cell = results.setdefault(f"{fraction:g}", {})
            for name, value in references(state, pool, pool_labels, labeled, test, args.image_size).items():
                cell.setdefault(name, []).append(value)
            for algorithm in args.algorithms:
                run_started, cpu_started = time.perf_counter(), time.process_time()
                top1, mask_rate = finetune(algorithm, state, pool, pool_labels, labeled, test, args, seed)
                cell.setdefault(algorithm, []).append(top1)
                mask_rates.setdefault(f"{fraction:g}", {}).setdefault(algorithm, []).append(mask_rate)
                print(f"seed {seed} fraction {fraction:g} ({len(labeled)} labels) {algorithm:<22} test top-1 "
                      f"{top1:.4f} mask rate {mask_rate:.3f} ({time.perf_counter() - run_started:.0f} s, "
                      f"{time.process_time() - cpu_started:.0f} CPU-s)", flush=True)
                payload = {"args": {key: str(value) for key, value in vars(args).items()}, "top1": results,
                           "final_mask_rate": mask_rates}
                results_file.write_text(json.dumps(payload, indent=1))
    print(f"\nFashion-MNIST, {args.pool_rows} train images as the pool, {args.test_rows} test images, "
          f"{args.image_size}px; {args.steps} fine-tune steps, labeled batch {args.batch_size}, unlabeled ratio "
          f"{args.unlabeled_ratio}, threshold {args.threshold}, lr {args.lr}, weight decay {args.weight_decay}, "
          f"eval EMA {args.eval_ema}, strong magnitude {args.strong_magnitude}, cutout {args.cutout}; "
          f"seeds {args.seeds}; "
          f"{time.perf_counter() - started:.0f} s in all, {args.threads} torch thread(s). "
          "Test top-1 mean +- sample std over seeds (2 shared CPU cores).")
    names = [*args.algorithms, "linear_probe_frozen", "knn20_frozen"]
    header = f"{'algorithm':<22}" + "".join(f"{f'{f:g} labels':>22}" for f in args.fractions)
    print(header)
    for name in names:
        cells = []
        for fraction in args.fractions:
            values = results[f"{fraction:g}"][name]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} +- {spread:.4f}")
        print(f"{name:<22}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
