"""``sslflow``: run | resume | ingest | evaluate | tune | pretrain | promote | ls."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

UI_HINT = "mlflow ui --backend-store-uri {uri}"


def _init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (or the one this job was submitted to), else start a local Ray whose
    workers run at the driver's priority (``pipelines.ray_train.init_ray``). With its dashboard: Ray Train frees the
    workers of a Tune trial stopped early through the state API it serves."""
    from pipelines.ray_train import init_ray

    init_ray(log_to_driver=True, include_dashboard=True)


def _load(path: str | None, overrides: dict | None = None):
    from pipelines.config import load_config

    return load_config(path, overrides)


def _check_against_data(cfg) -> None:
    """The rules that need the data, checked before anything starts when the data is already ingested
    (``data.path`` holds an ingest of ``data.source``); otherwise the stages check them before their workers start."""
    from pipelines.datasets import MANIFEST_NAME, read_manifest
    from pipelines.pretraining import check_pretrain_batch

    if (Path(cfg.data.path) / MANIFEST_NAME).is_file():
        manifest = read_manifest(cfg.data.path)
        if manifest.get("source") == cfg.data.source:
            check_pretrain_batch(cfg, manifest)


def cmd_run(args: argparse.Namespace) -> int:
    import time

    from pipelines.dag import run_pipeline
    from pipelines.summary import summary_table

    cfg = _load(args.config)
    _check_against_data(cfg)
    started = time.perf_counter()
    if args.dry_run:
        result = run_pipeline(cfg, force=args.force, dry_run=True)
        print(f"pipeline {cfg.name} (dry run): tracking {cfg.tracking.uri}")
        for stage in result.plan:
            print(f"  {stage.name:<9} {stage.fingerprint or '?':<20}  {stage.reason}")
        return 0
    _init_ray()
    result = run_pipeline(cfg, force=args.force)
    print(summary_table(cfg, result, time.perf_counter() - started))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipelines.stages.ingest import ingest

    manifest = ingest(args.source, Path(args.out), val_fraction=args.val_fraction, label_fraction=args.label_fraction,
                      seed=args.seed, download=args.download, overwrite=args.overwrite,
                      npz_keys=_npz_keys(args.npz_key))
    splits = ", ".join(f"{name} {info['rows']}" for name, info in manifest["splits"].items())
    print(f"ingested {args.source} -> {args.out}: {splits}; {manifest['corrupt_count']} corrupt images skipped")
    for item in manifest["corrupt"][:20]:
        print(f"  corrupt: {item['path']}: {item['reason']}")
    return 0


def _npz_keys(pairs: list[str]) -> dict[str, str]:
    """``["x=train_images", "y=train_labels"]`` -> ``{"x": "train_images", "y": "train_labels"}``."""
    keys: dict[str, str] = {}
    for pair in pairs:
        role, sep, name = pair.partition("=")
        if not sep or not role or not name:
            raise ValueError(f"--npz-key {pair!r} must be ROLE=NAME (roles: x, y, x_test, y_test)")
        keys[role] = name
    return keys


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score an encoder on a labeled split, against the untrained encoder and raw pixels (no Ray)."""
    from pipelines.scoring import evaluate_model, scores_table

    cfg = _load(args.config)
    run_id, scores, rows = evaluate_model(
        cfg.tracking, args.model_uri, args.data, split=args.split, knn_k=args.knn_k, knn_temperature=args.knn_t,
        image_size=args.image_size, probe_epochs=args.probe_epochs, seed=args.seed, npz_keys=_npz_keys(args.npz_key))
    print(f"{args.model_uri} on {args.data} [{args.split}]: {rows.description}")
    print(f"kNN k={min(args.knn_k, len(rows.bank_labels))} t={args.knn_t}; linear probe {args.probe_epochs} epochs")
    print(scores_table(scores))
    print(f"logged to MLflow run {run_id}; open the UI with: " + UI_HINT.format(uri=cfg.tracking.uri))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """The search alone (ingest reused or run first), in a pipeline run that stops after ``tune``."""
    from pipelines.dag import run_pipeline
    from pipelines.summary import trials_table

    cfg = _load(args.config, {"tune": {"enabled": True}})
    _init_ray()
    result = run_pipeline(cfg, force=["tune"] if args.force else [], until="tune")
    print(trials_table(cfg, result.records["tune"]))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """The pretrain stage alone (ingesting first if the dataset is missing), in its own MLflow run."""
    from pipelines import tracking
    from pipelines.datasets import MANIFEST_NAME
    from pipelines.stages import pretrain
    from pipelines.stages.ingest import ingest

    cfg = _load(args.config)
    if not (Path(cfg.data.path) / MANIFEST_NAME).is_file():
        ingest(cfg.data.source, cfg.data.path, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed,
               npz_keys=cfg.data.npz_keys)
    _check_against_data(cfg)
    _init_ray()
    with tracking.run(cfg.tracking, "pretrain", {tracking.STAGE_TAG: "pretrain-only"}, params=cfg.to_dict()) as run_id:
        record = pretrain.run(cfg, run_id, {})
    print(f"pretrain finished: run {run_id}; encoder {record.encoder_uri}; metrics {record.metrics}")
    print("open the UI with: " + UI_HINT.format(uri=cfg.tracking.uri))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from pipelines.stages.promote import promote

    cfg = _load(args.config)
    decision = promote(cfg.tracking, args.model, args.version, cfg.registry.promote_margin, force=args.force)
    print(f"{args.model}/{args.version}: {'promoted' if decision['promoted'] else 'not promoted'}: {decision['reason']}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from pipelines.summary import list_pipelines

    print(list_pipelines(_load(args.config), limit=args.limit))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    for name in ("run", "resume"):
        run = commands.add_parser(name, help="run the pipeline (reusing finished stages); resume = run")
        run.add_argument("config", nargs="?", help="pipeline YAML (default: the embedded quickstart)")
        run.add_argument("--dry-run", action="store_true", help="show the stages, which would be reused, and why")
        run.add_argument("--force", action="append", default=[], metavar="STAGE",
                         help="rerun STAGE and everything downstream (repeatable)")
        run.set_defaults(func=cmd_run)

    ingest = commands.add_parser("ingest", help="write a source as Parquet shards + _manifest.json")
    ingest.add_argument("source", help="builtin:digits, an image folder, a .npz, cifar10:/cifar100:/stl10:PATH")
    ingest.add_argument("out")
    ingest.add_argument("--val-fraction", type=float, default=0.1,
                        help="labeled train rows set aside as the kNN monitor's queries (pretraining still trains "
                             "on them; 0: the monitor holds out a slice of the labeled rows instead)")
    ingest.add_argument("--label-fraction", type=float, default=1.0)
    ingest.add_argument("--seed", type=int, default=0)
    ingest.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR/STL-10")
    ingest.add_argument("--overwrite", action="store_true", help="replace an earlier ingest output at OUT")
    ingest.add_argument("--npz-key", action="append", default=[], metavar="ROLE=NAME",
                        help="name an .npz array by role: x, y, x_test, y_test (repeatable; default: found by "
                             "its common names x/x_train/images, y/y_train/labels, x_test, y_test)")
    ingest.set_defaults(func=cmd_ingest)

    evaluate = commands.add_parser(
        "evaluate", help="kNN and linear-probe accuracy of an encoder on a labeled split, against the untrained "
                         "encoder and raw pixels; logged to MLflow")
    evaluate.add_argument("model_uri", help="MLflow model URI of an encoder (e.g. a pretrain run's encoder_uri)")
    evaluate.add_argument("data", help="an ingest output folder, or any `sslflow ingest` SOURCE (ingested to a "
                                       "temporary folder)")
    evaluate.add_argument("--split", default="test", help="the labeled split to score on (default test)")
    evaluate.add_argument("--knn-k", type=int, default=200)
    evaluate.add_argument("--knn-t", type=float, default=0.1, help="kNN temperature")
    evaluate.add_argument("--image-size", type=int, default=None,
                          help="default: data.image_size of the run that logged the model")
    evaluate.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--npz-key", action="append", default=[], metavar="ROLE=NAME",
                          help="as in ingest, when DATA is an .npz")
    evaluate.add_argument("--config", default=None, help="for the tracking URI (default quickstart)")
    evaluate.set_defaults(func=cmd_evaluate)

    tune = commands.add_parser("tune", help="run the Ray Tune search alone and print its trials, best first")
    tune.add_argument("config", nargs="?", help="pipeline YAML; its tune section (enabled or not) sets the search")
    tune.add_argument("--force", action="store_true", help="search again even if a finished search matches")
    tune.set_defaults(func=cmd_tune)

    pretrain = commands.add_parser("pretrain", help="run the pretrain stage alone")
    pretrain.add_argument("config", nargs="?")
    pretrain.set_defaults(func=cmd_pretrain)

    promote = commands.add_parser("promote", help="move the champion alias to MODEL/VERSION if it wins (or --force)")
    promote.add_argument("model")
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="a person's decision: skip the metric gate")
    promote.add_argument("--config", default=None, help="for the tracking URI and margin (default quickstart)")
    promote.set_defaults(func=cmd_promote)

    ls = commands.add_parser("ls", help="list pipeline runs with their stages' status and key metrics")
    ls.add_argument("--config", default=None)
    ls.add_argument("--limit", type=int, default=10)
    ls.set_defaults(func=cmd_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"sslflow: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
