"""``sslflow``: run | resume | ingest | evaluate | tune | pretrain | promote | serve | ls | show | report."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

UI_HINT = "mlflow ui --backend-store-uri {uri}"
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the environment of a `ray job submit` driver: `sslflow run` then prints
everything (the job log is read with `ray job logs`, not watched on a terminal)."""


def _init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (or the one this job was submitted to), else start a local Ray whose
    workers run at the driver's priority (``pipelines.ray_train.init_ray``). With its dashboard: Ray Train frees the
    workers of a Tune trial stopped early through the state API it serves. A local Ray is watched by
    ``pipelines.guardian``: if this process dies without shutting it down (``kill -9``), nothing it started lingers."""
    import ray

    from pipelines import guardian
    from pipelines.ray_train import init_ray

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS") and RAY_JOB_ENV not in os.environ:
        guardian.start(os.getpid())
    init_ray(log_to_driver=True, include_dashboard=True)


def _load(path: str | None, overrides: dict | None = None):
    """The validated config, its tracking server checked to answer (``tracking.check_reachable``: seconds, not
    MLflow's minutes of retries) before anything starts. Commands call it before importing their stages, and it
    imports MLflow only after the config loads, so a config error comes back without their import time."""
    from pipelines.config import load_config

    cfg = load_config(path, overrides)
    from pipelines import tracking

    tracking.check_reachable(cfg.tracking)
    return cfg


def _check_against_data(cfg) -> None:
    """The rules that need the data, checked before anything starts when the data is already ingested
    (``data.path`` holds an ingest of ``data.source``); otherwise the stages check them before their workers start."""
    from pipelines.datasets import has_manifest, read_manifest
    from pipelines.pretraining import check_pretrain_batch

    if has_manifest(cfg.data.path):
        manifest = read_manifest(cfg.data.path)
        if manifest.get("source") == cfg.data.source:
            check_pretrain_batch(cfg, manifest)
            if cfg.tune.enabled:  # the space depends on the rows (MoCo's queue sizes): every value it can pick
                from pipelines.config import check_search_values, search_space

                check_search_values(cfg, search_space(cfg, manifest["splits"]["train"]["rows"])[0])


def _check_fits_machine(cfg) -> None:
    """On the embedded local Ray (no ``RAY_ADDRESS``, not a ``ray job submit`` driver): refuse, before Ray starts,
    workers this machine cannot hold (``config.machine_shortfall`` against its usable CPUs and CUDA GPUs), which Ray
    would wait for forever. On a cluster a stage waits at most ``scaling.resource_wait_s`` (``ray_train.fit``)."""
    from pipelines.config import machine_shortfall

    if os.environ.get("RAY_ADDRESS") or RAY_JOB_ENV in os.environ:
        return
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    shortfall = machine_shortfall(cfg, cpus, torch.cuda.device_count())
    if shortfall is not None:
        raise ValueError(f"{shortfall} (the local Ray this command starts; no RAY_ADDRESS is set): lower those "
                         "keys, or run on a cluster (RAY_ADDRESS, `ray job submit`)")


def cmd_run(args: argparse.Namespace) -> int:
    import time

    cfg = _load(args.config)
    from pipelines.dag import run_pipeline
    from pipelines.summary import summary_table

    _check_against_data(cfg)
    _check_fits_machine(cfg)
    started = time.perf_counter()
    if args.dry_run:
        result = run_pipeline(cfg, force=args.force, dry_run=True)
        print(f"pipeline {cfg.name} (dry run): tracking {cfg.tracking.uri}")
        for stage in result.plan:
            print(f"  {stage.name:<9} {stage.fingerprint or '?':<20}  {stage.reason}")
        return 0

    def pipeline(console):
        result = run_pipeline(cfg, force=args.force, **_watching(cfg, console))
        if console is not None:
            console.line("  writing the report")
        return result.run_id, (result, _write_report(cfg, result.run_id))

    result, report_path = _quietly(cfg, args, "run", pipeline)
    print(summary_table(cfg, result, time.perf_counter() - started))
    print(f"report: {report_path}")
    return 0


def _quietly(cfg, args: argparse.Namespace, command: str, body: Callable[[Any], tuple[str, Any]],
             start_ray: bool = True) -> Any:
    """``body(console)`` (with Ray started unless ``start_ray`` is false); returns the second item ``body``
    returns. By default the terminal is quiet (``pipelines.console``): Ray's and MLflow's output goes to a log file
    (its path printed first) that becomes the artifact ``logs/`` of the MLflow run whose id ``body`` returns first,
    and ``body`` gets the ``Console`` for stage lines and progress. With ``-v``, or in a driver submitted with
    ``ray job submit`` (whose job log is the place for everything), ``body`` gets None and everything is printed."""
    if args.verbose or RAY_JOB_ENV in os.environ:
        if start_ray:
            _init_ray()
        return body(None)[1]
    import ray

    from pipelines import tracking
    from pipelines.console import log_file_path, quiet_terminal

    log_path = log_file_path(cfg.tracking.uri)
    print(f"Ray and MLflow output: {log_path} (sslflow -v {command} shows it here)", flush=True)
    with quiet_terminal(log_path) as console:
        started_ray = start_ray and not ray.is_initialized()
        try:
            if start_ray:
                _init_ray()
            run_id, value = body(console)
        finally:
            if started_ray:
                ray.shutdown()  # inside the quiet block: Ray's goodbye lines go to the log too
    tracking.log_artifact(cfg.tracking, run_id, log_path, "logs")
    return value


def _watching(cfg, console) -> dict[str, Any]:
    """``run_pipeline``'s ``echo`` and ``monitor`` for a quiet terminal's ``console`` (none with -v: print)."""
    from pipelines.console import ProgressMonitor

    if console is None:
        return {}
    return {"echo": console.line, "monitor": lambda run_id: ProgressMonitor(cfg.tracking, run_id, console)}


def _write_report(cfg, run_id: str) -> Path:
    from pipelines.report import write_report

    return write_report(cfg.tracking, run_id)


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipelines.stages.ingest import ingest

    if args.ray:
        _init_ray()
    manifest = ingest(args.source, args.out, val_fraction=args.val_fraction, label_fraction=args.label_fraction,
                      seed=args.seed, download=args.download, overwrite=args.overwrite,
                      npz_keys=_npz_keys(args.npz_key), executor="ray" if args.ray else "threads",
                      progress=True, **({"shard_rows": args.shard_rows} if args.shard_rows else {}))
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

    def scoring(console):
        run_id, scores, rows = evaluate_model(
            cfg.tracking, args.model_uri, args.data, split=args.split, knn_k=args.knn_k, knn_temperature=args.knn_t,
            image_size=args.image_size, probe_epochs=args.probe_epochs, seed=args.seed,
            npz_keys=_npz_keys(args.npz_key))
        return run_id, (run_id, scores, rows)

    run_id, scores, rows = _quietly(cfg, args, "evaluate", scoring, start_ray=False)
    print(f"{args.model_uri} on {args.data} [{args.split}]: {rows.description}")
    print(f"kNN k={min(args.knn_k, len(rows.bank_labels))} t={args.knn_t}; linear probe {args.probe_epochs} epochs")
    print(scores_table(scores))
    print(f"logged to MLflow run {run_id}; open the UI with: " + UI_HINT.format(uri=cfg.tracking.uri))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """The search alone (ingest reused or run first), in a pipeline run that stops after ``tune``."""
    cfg = _load(args.config, {"tune": {"enabled": True}})
    from pipelines.dag import run_pipeline
    from pipelines.summary import trials_table

    _check_against_data(cfg)
    _check_fits_machine(cfg)

    def search(console):
        result = run_pipeline(cfg, force=["tune"] if args.force else [], until="tune", **_watching(cfg, console))
        return result.run_id, result

    result = _quietly(cfg, args, "tune", search)
    print(trials_table(cfg, result.records["tune"]))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """The pretrain stage alone (ingesting first if the dataset is missing), in its own MLflow run."""
    cfg = _load(args.config)
    from pipelines import tracking
    from pipelines.console import ProgressMonitor
    from pipelines.datasets import has_manifest
    from pipelines.stages import pretrain
    from pipelines.stages.ingest import ingest

    if not has_manifest(cfg.data.path):
        ingest(cfg.data.source, cfg.data.path, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed,
               npz_keys=cfg.data.npz_keys)
    _check_against_data(cfg)
    _check_fits_machine(cfg)

    def pretrain_alone(console):
        with tracking.run(cfg.tracking, tracking.stage_run_name(cfg.name, "pretrain-only"),
                          {tracking.STAGE_TAG: "pretrain-only", tracking.PIPELINE_TAG: cfg.name},
                          params=cfg.to_dict()) as run_id:
            watching = nullcontext() if console is None else \
                ProgressMonitor(cfg.tracking, run_id, console, root_name="pretrain")
            with watching:
                record = pretrain.run(cfg, run_id, {})
        return run_id, (run_id, record)

    run_id, record = _quietly(cfg, args, "pretrain", pretrain_alone)
    print(f"pretrain finished: run {run_id}; encoder {record.encoder_uri}; metrics {record.metrics}")
    print("open the UI with: " + UI_HINT.format(uri=cfg.tracking.uri))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from pipelines.stages.promote import promote

    from pipelines import tracking

    cfg = _load(args.config)
    tracking.check_model_version(cfg.tracking, args.model, args.version)  # one line naming what does not exist
    decision = promote(cfg.tracking, args.model, args.version, cfg.registry.promote_margin, force=args.force)
    print(f"{args.model}/{args.version}: {'promoted' if decision['promoted'] else 'not promoted'}: {decision['reason']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.serving.app import ServeOptions, run_app

    cfg = _load(args.config)
    options = ServeOptions(tracking_uri=cfg.tracking.uri, name=args.name or cfg.registry.model_name, alias=args.alias,
                           poll_seconds=args.poll_seconds, max_batch_size=args.max_batch_size,
                           num_replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    _init_ray()
    run_app(options, host=args.host, port=args.port)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the HTML report of a pipeline run (``pipelines.report``) and log it as the run's artifact."""
    from pipelines.report import write_report

    cfg = _load(args.config)
    print(f"report: {write_report(cfg.tracking, args.run_id)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from pipelines.summary import show_run

    print(show_run(_load(args.config), args.run_id))
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
    ingest.add_argument("out", help="a local folder, or s3://BUCKET/PREFIX or gs://BUCKET/PREFIX (credentials and "
                        "endpoint from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)")
    ingest.add_argument("--ray", action="store_true",
                        help="decode/check/encode as Ray tasks, one per chunk of --shard-rows files (joins RAY_ADDRESS "
                        "or starts a local Ray); default: threads in this process")
    ingest.add_argument("--shard-rows", type=int, default=None, help="rows per shard and per task (default 8192)")
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

    serve = commands.add_parser("serve", help="serve NAME@ALIAS over HTTP with Ray Serve; follows the alias")
    serve.add_argument("name", nargs="?", default=None, help="registered model (default: registry.model_name)")
    serve.add_argument("--alias", default="champion")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    serve.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (0: CPU)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="images of up to this many requests per forward")
    serve.add_argument("--poll-seconds", type=float, default=10.0, help="how often to check the alias (0: never)")
    serve.add_argument("--config", default=None, help="for the tracking URI and model name (default quickstart)")
    serve.set_defaults(func=cmd_serve)

    ls = commands.add_parser("ls", help="list pipeline runs with their stages' status and key metrics")
    ls.add_argument("--config", default=None)
    ls.add_argument("--limit", type=int, default=10)
    ls.set_defaults(func=cmd_ls)

    report = commands.add_parser("report", help="write the HTML report of a pipeline run (and log it to the run)")
    report.add_argument("run_id", nargs="?", help="a pipeline run id (`sslflow ls`); default: the newest")
    report.add_argument("--config", default=None, help="for the tracking URI (default quickstart)")
    report.set_defaults(func=cmd_report)

    show = commands.add_parser("show", help="one pipeline run: its stages, metrics, artifacts, registry versions")
    show.add_argument("run_id", nargs="?", help="a pipeline run id (`sslflow ls`); default: the newest")
    show.add_argument("--config", default=None, help="for the tracking URI (default quickstart)")
    show.set_defaults(func=cmd_show)

    parser.add_argument("-v", "--verbose", action="store_true",
                        help="everything Ray and MLflow print, on the terminal; tracebacks of every error")
    for command in commands.choices.values():  # `sslflow run -v` as well as `sslflow -v run`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)
    return parser


def what_to_do(error: BaseException) -> str:
    """The one line that ends a user error's message: what to do about it (the hint for its message when
    ``pipelines.console.ERROR_HINTS`` has one, else the one for its type)."""
    from pipelines.console import hint_for

    hint = hint_for(str(error))
    if hint is not None:
        return hint
    if isinstance(error, FileExistsError):
        return "choose another output path, or pass --overwrite to replace it"
    if isinstance(error, FileNotFoundError):
        return "check the path above (relative paths are from the current folder), then run the command again"
    if isinstance(error, ConnectionError):
        return ("start the server named above or make it reachable from here (or set tracking.uri / "
                "MLFLOW_TRACKING_URI to one that is), then run again")
    return ("fix the value named above (in the config file or on the command line) and run again; "
            "`sslflow run CONFIG --dry-run` checks a config without running anything")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: the pipeline ended its stage runs KILLED (pipelines.dag); no traceback
        print("sslflow: interrupted (Ctrl-C): the runs in progress ended KILLED; run the same command again to "
              "resume", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except USER_ERRORS as error:
        error = getattr(error, "cause", None) if isinstance(getattr(error, "cause", None), USER_ERRORS) else error
        if args.verbose:
            raise
        print(f"sslflow: error: {error}", file=sys.stderr)
        print(f"sslflow: {what_to_do(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug: one line by default, the traceback with -v
        if args.verbose:
            raise
        print(f"sslflow: internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
              file=sys.stderr)
        print("sslflow: rerun with -v for the traceback, and report it with the log file named above",
              file=sys.stderr)
        return 1


INTERRUPTED_EXIT_CODE = 130
"""What a shell reports for a command ended by SIGINT (128 + 2)."""
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ConnectionError)
"""What a person's input causes (a config value, a path, an existing output, a server that does not answer, as
``tracking.TrackingUnreachable``): a message and what to do, no
traceback unless -v. Ray wraps a stage's error in ``RayTaskError`` that is also an instance of it (``.cause``)."""


if __name__ == "__main__":
    sys.exit(main())
