"""The `aevb-dist` command line. Heavy imports happen inside each command, so `--help` is fast.

A user mistake prints one line and exits 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Optional

from aevb_dist import __version__, compat, names
from aevb_dist.console import Interrupted, is_user_error


def _cmd_config(args: argparse.Namespace) -> int:
    from aevb_dist.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from aevb_dist.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.ray.local_mode:  # the workers' fork server imports torch while this process does
        from aevb_dist.train.fork_server import prestart

        prestart()
    from aevb_dist.train.driver import train

    train(cfg, wait_for_lease=not args.no_wait)
    return 0


def _sweep_options(args: argparse.Namespace):
    from aevb_dist.sweep.tuning import SweepOptions

    return SweepOptions(
        name=args.name,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        scheduler=args.scheduler,
        metric=args.metric,
    )


def _cmd_sweep(args: argparse.Namespace) -> int:
    from aevb_dist.config import load_config
    from aevb_dist.sweep.driver import sweep

    sweep(load_config(args.config, args.overrides), args.space, _sweep_options(args))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from aevb_dist.data.images import ImageOptions
    from aevb_dist.data.prepare import CountOptions, prepare

    prepare(
        args.source,
        args.output_uri,
        fmt=args.format,
        num_shards=args.num_shards,
        split=args.split,
        overwrite=args.overwrite,
        rows_per_row_group=args.rows_per_row_group,
        seed=args.seed,
        test_fraction=args.test_fraction,
        value_range=args.value_range,
        image_options=ImageOptions(
            size=tuple(args.size) if args.size else None,
            grayscale=args.grayscale,
            skip_bad=args.skip_bad,
            image_column=args.image_column,
            label_column=args.label_column,
        ),
        count_options=CountOptions(
            layer=args.layer,
            batch_key=args.batch_key,
            labels_key=args.labels_key,
            categorical_covariate_keys=tuple(args.categorical_covariate_keys or ()),
        ),
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from aevb_dist.eval.jobs import evaluate

    result = evaluate(
        args.checkpoint_uri,
        args.data_uri,
        num_importance_samples=args.num_importance_samples,
        num_workers=args.num_workers,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        seed=args.seed,
        output_uri=args.output,
        endpoint_url=args.s3_endpoint_url,
        ray_address=args.ray_address,
        estimator=args.estimator,
        num_steps=args.num_steps,
        num_leapfrog=args.leapfrog_steps,
        use_gpu=args.use_gpu,
        save_in_run_folder=True,
    )
    print(json.dumps(result, indent=2))
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    from aevb_dist.eval.jobs import encode

    rows = encode(
        args.checkpoint_uri,
        args.data_uri,
        args.output_uri,
        num_workers=args.num_workers,
        seed=args.seed,
        overwrite=args.overwrite,
        endpoint_url=args.s3_endpoint_url,
        ray_address=args.ray_address,
    )
    print(f"aevb-dist: wrote q(z|x) for {rows:,} examples to {args.output_uri}", file=sys.stderr)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from aevb_dist.eval.plotting import plot_run

    for uri in plot_run(args.run_uri, args.output, endpoint_url=args.s3_endpoint_url, data_uri=args.data):
        print(uri)
    return 0


def _cmd_variance(args: argparse.Namespace) -> int:
    import json

    from aevb_dist.eval.variance import checkpoint_gradient_variance

    report = checkpoint_gradient_variance(
        args.checkpoint_uri,
        args.data_uri,
        batch_size=args.batch_size,
        estimators=tuple(args.estimators),
        latent_samples=args.num_latent_samples,
        num_draws=args.num_draws,
        seed=args.seed,
        endpoint_url=args.s3_endpoint_url,
    )
    print(json.dumps(report, indent=2))
    if args.plot:
        from aevb_dist.eval.plotting import gradient_variance_figure, write_figure

        write_figure(gradient_variance_figure(report), args.plot, args.s3_endpoint_url)
        print(f"aevb-dist: wrote {args.plot}", file=sys.stderr)
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from aevb_dist.quickstart import quickstart

    quickstart(args.output, args.dataset)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from aevb_dist.config import load_config
    from aevb_dist.submit import submit

    cfg = load_config(args.config, args.overrides)  # a bad config never reaches the cluster
    pass_env = tuple(name.strip() for name in (args.pass_env or "").split(",") if name.strip())
    sweep = None
    if args.sweep is not None:
        if not os.path.exists(args.sweep):
            raise ValueError(f"search space file not found: {args.sweep}")
        options = ["--num-samples", str(args.num_samples), "--scheduler", args.scheduler, "--metric", args.metric]
        options += ["--name", args.name] + (
            ["--max-concurrent", str(args.max_concurrent)] if args.max_concurrent else []
        )
        sweep = (args.sweep, options)
    _, status = submit(
        cfg,
        address=args.address,
        entrypoint=args.entrypoint,
        wait=not args.no_wait,
        pip=args.pip,
        pass_env=pass_env,
        sweep=sweep,
    )
    return status


def _cmd_jobs(args: argparse.Namespace) -> int:
    from aevb_dist.submit import jobs

    return jobs(args.action, args.job_id, args.address)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aevb-dist",
        description="Distributed Auto-Encoding Variational Bayes (Kingma & Welling, 2013) on Ray Train.",
    )
    parser.add_argument("--version", action="version", version=f"aevb-dist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML config file (see configs/)")
        p.add_argument(
            "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.num_workers=2 run.name=exp1"
        )

    p = sub.add_parser("quickstart", help="prepare bundled data, train with 2 workers, evaluate and plot (~1 min)")
    p.add_argument(
        "--output", default="aevb-quickstart", help="folder for data, run and plots (default ./aevb-quickstart)"
    )
    p.add_argument(
        "--dataset",
        choices=["digits", "fashion-mnist"],
        default="digits",
        help="scikit-learn's 8x8 digits (default), or Debian's Fashion-MNIST if installed",
    )
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("config", help="print the resolved, validated config")
    add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "train", help="train a VAE with data-parallel Ray Train workers (resumes a run of the same name)"
    )
    add_config_args(p)
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="refuse a run whose earlier driver, on another machine, stopped beating less than "
        "run.lease_timeout_s ago, instead of waiting for its lease to expire",
    )
    p.set_defaults(func=_cmd_train)

    def add_sweep_args(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument(
            "--space" if required else "--sweep",
            required=required,
            metavar="SPACE.yaml",
            help="config keys and their samplers, e.g. 'optim.lr: loguniform(1e-4, 1e-2)' (docs/sweeps.md)"
            + ("" if required else ": submit a sweep instead of one run"),
        )
        p.add_argument("--num-samples", type=int, default=1, help="trials drawn (each grid point this often)")
        p.add_argument(
            "--max-concurrent", type=int, default=None, help="trials at once (default: as many as the CPUs hold)"
        )
        p.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo", help="asha stops poor trials early")
        p.add_argument("--metric", choices=["test_elbo", "train_elbo"], default="test_elbo", help="what is maximized")
        p.add_argument("--name", default="sweep", help="the sweep's folder in run.storage_uri; the same name resumes")

    p = sub.add_parser(
        "sweep", help="a Ray Tune search over config keys, each trial a training run (resumes a sweep of the same name)"
    )
    add_config_args(p)
    add_sweep_args(p, required=True)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "prepare",
        help="convert MNIST/Fashion-MNIST IDX, Frey Face .mat, .npy/.npz, a folder of "
        "PNG/JPEG images, Parquet of encoded images, or counts (AnnData .h5ad, a 10x folder, a scipy.sparse "
        ".npz) to sharded Parquet",
    )
    p.add_argument(
        "source",
        help="a folder of IDX .gz files, a .mat file, a .npy/.npz file, a folder of images "
        "(--format imagefolder), a Parquet file/folder of encoded images, an .h5ad, a 10x folder "
        "(matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz) or a scipy.sparse .npz",
    )
    p.add_argument("output_uri", help="where to write OUTPUT_URI/train/part-*.parquet and OUTPUT_URI/test/...")
    p.add_argument(
        "--format",
        choices=["auto", *names.DATASET_FORMATS],
        default="auto",
        help="source format (default: guessed from the source)",
    )
    p.add_argument("--num-shards", type=int, default=4, help="Parquet files per split (default 4)")
    p.add_argument("--split", choices=["train", "test", "both"], default="both", help="which splits to write")
    p.add_argument(
        "--rows-per-row-group",
        type=int,
        default=1000,
        help="rows per Parquet row group, the reader's unit of work (default 1000)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="test share for sources without a split (Frey Face, .npy, count matrices), default 0.1",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split for sources without one")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at OUTPUT_URI")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="images (imagefolder, parquet): center-crop to this aspect ratio, then resize",
    )
    p.add_argument("--grayscale", action="store_true", help="images: convert to one channel")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="images: leave out (and count) files that do not decode, instead of stopping",
    )
    p.add_argument("--image-column", default=None, help="parquet: the column of encoded images (default: image)")
    p.add_argument("--label-column", default=None, help="parquet: the label column (default: label, if any)")
    p.add_argument("--layer", default=None, help="h5ad: the layer of raw counts (default: X)")
    p.add_argument("--batch-key", default=None, help="counts: the obs column of each cell's batch (column `batch`)")
    p.add_argument("--labels-key", default=None, help="counts: the obs column of each cell's label (column `label`)")
    p.add_argument(
        "--categorical-covariate-keys",
        nargs="+",
        default=None,
        metavar="KEY",
        help="counts: more obs columns of categorical covariates, each kept under its own name",
    )
    p.add_argument(
        "--value-range",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="the pixels' full scale, mapped to [0, 1] (default: 0/1 data is binary, uint8 is 0 255, "
        "floats in [0, 1] stay; other integers must say it)",
    )
    p.set_defaults(func=_cmd_prepare)

    def add_cluster_args(p: argparse.ArgumentParser, workers: bool = True) -> None:
        if workers:
            p.add_argument("--num-workers", type=int, default=2, help="Ray tasks running at once (default 2)")
            p.add_argument(
                "--ray-address",
                default=None,
                help="join this Ray cluster (auto, ray://host:10001); default: an embedded local Ray",
            )
        p.add_argument(
            "--s3-endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs (default: $AWS_ENDPOINT_URL)"
        )

    p = sub.add_parser("submit", help="submit training (or another command) to a Ray cluster as a Ray Job")
    add_config_args(p)
    p.add_argument(
        "--address",
        default=None,
        help="the Ray job server, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS or 127.0.0.1:8265)",
    )
    p.add_argument(
        "--entrypoint",
        default=None,
        help='run this aevb-dist command instead of training, e.g. "evaluate s3://b/runs/x s3://b/test"',
    )
    p.add_argument("--no-wait", action="store_true", help="print the job id and return; do not follow the logs")
    p.add_argument(
        "--pip",
        action="store_true",
        help="install this machine's versions of the requirements in the job's runtime environment",
    )
    p.add_argument(
        "--pass-env",
        default=None,
        metavar="NAMES",
        help="forward these environment variables (comma-separated, e.g. AWS_ACCESS_KEY_ID,"
        "AWS_SECRET_ACCESS_KEY) to the job; its metadata is readable by every client of the job "
        "server. Default: none, the cluster's own identity reaches storage",
    )
    add_sweep_args(p, required=False)
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("jobs", help="list, status, logs, follow or stop Ray Jobs")
    p.add_argument("action", choices=["list", "status", "logs", "follow", "stop"], help="what to do")
    p.add_argument("job_id", nargs="?", default=None, help="the job id printed by `aevb-dist submit`")
    p.add_argument(
        "--address",
        default=None,
        help="the Ray job server, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS or 127.0.0.1:8265)",
    )
    p.set_defaults(func=_cmd_jobs)

    p = sub.add_parser(
        "evaluate", help="dataset mean ELBO and log p(x) (importance sampling, AIS or Appendix D), as JSON"
    )
    p.add_argument("checkpoint_uri", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("data_uri", help="a Parquet dataset split, e.g. data/mnist/test")
    p.add_argument(
        "--estimator",
        default="is",
        choices=names.MARGINAL_LIKELIHOOD_ESTIMATORS,
        help="log p(x) estimator: is = importance sampling with q(z|x) (default); ais = annealed "
        "importance sampling from the prior with HMC; appendix-d = the paper's Appendix D "
        "(HMC posterior samples, fitted density, harmonic mean; for few latents)",
    )
    p.add_argument(
        "--num-importance-samples",
        "-k",
        type=int,
        default=5000,
        help="K importance samples per example for is (default 5000); for ais and appendix-d, "
        "the number of HMC chains per example (16 is a good start)",
    )
    p.add_argument(
        "--num-steps",
        type=int,
        default=500,
        help="ais: annealing steps; appendix-d: HMC transitions per chain (default 500)",
    )
    p.add_argument("--leapfrog-steps", type=int, default=10, help="leapfrog steps per HMC transition (default 10)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=names.EVAL_BATCH_SIZE,
        help=f"examples per forward pass (default {names.EVAL_BATCH_SIZE}, as training's test-set evaluation)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=100,
        help="importance samples per pass (default 100: 100 × a batch of 100 stays cache-friendly)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the test binarization")
    p.add_argument(
        "--output",
        default=None,
        help="also write the JSON to this URI (it is always kept in the run folder too, as eval_SPLIT.json, "
        "or eval_SPLIT_ESTIMATOR.json for ais and appendix-d)",
    )
    p.add_argument(
        "--use-gpu",
        action="store_true",
        help="one GPU per Ray task (the cluster must have GPUs); the noise then comes from the GPU's generator",
    )
    add_cluster_args(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("encode", help="write the posterior q(z|x) (mean, std) of every example as Parquet")
    p.add_argument("checkpoint_uri", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("data_uri", help="a Parquet dataset split")
    p.add_argument("output_uri", help="where to write part-*.parquet with index, label, mean, std")
    p.add_argument("--seed", type=int, default=0, help="seed of the binarization for Bernoulli models")
    p.add_argument("--overwrite", action="store_true", help="replace what is at OUTPUT_URI")
    add_cluster_args(p)
    p.set_defaults(func=_cmd_encode)

    p = sub.add_parser("plot", help="PNGs: lower bound vs samples (Fig. 2), 2-D manifold (Fig. 4), samples")
    p.add_argument("run_uri", help="a run folder: {run.storage_uri}/{run.name}")
    p.add_argument("--output", default=None, help="folder for the PNGs (default RUN_URI/plots)")
    p.add_argument(
        "--data",
        default=None,
        metavar="DATA_URI",
        help="models of counts: a dataset split whose cells' latents are drawn by label and by covariate",
    )
    add_cluster_args(p, workers=False)
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("variance", help="variance of the ELBO gradient under estimators A, B and IWAE on one batch")
    p.add_argument("checkpoint_uri", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("data_uri", help="a Parquet dataset split; the first batch of it is used")
    p.add_argument("--batch-size", type=int, default=100, help="minibatch size M (default 100)")
    p.add_argument("--num-draws", type=int, default=100, help="gradient draws per estimator (default 100)")
    p.add_argument(
        "--num-latent-samples",
        type=int,
        nargs="+",
        default=[1],
        help="L per draw (K for iwae); several values sweep them, e.g. 1 5 25 (default 1)",
    )
    p.add_argument(
        "--estimators",
        nargs="+",
        default=list(names.ESTIMATORS),
        choices=names.ESTIMATORS,
        help="estimators to compare (default A B iwae)",
    )
    p.add_argument(
        "--plot", default=None, metavar="URI", help="also write a PNG of the variances against L, e.g. variance.png"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, the batch choice and the binarization")
    add_cluster_args(p, workers=False)
    p.set_defaults(func=_cmd_variance)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come after options (`submit CONFIG --address URL train.max_steps=9`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    before = _sigterm_as_interrupt()
    try:
        return args.func(args)
    except Exception as err:
        if args.debug or not is_user_error(err):
            raise
        cause = getattr(err, "cause", None) or err  # a Ray task's error carries the original as .cause
        message = str(cause).strip().splitlines()
        print(f"aevb-dist {args.command}: error: {message[0] if message else type(cause).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: 128 + the signal's number (console.Interrupted)
        if not getattr(err, "told", False):
            print(f"aevb-dist {args.command}: interrupted", file=sys.stderr)
        return err.exit_status if isinstance(err, Interrupted) else 128 + signal.SIGINT
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _sigterm_as_interrupt():
    """SIGTERM ends the command at any stage as Ctrl-C does (a run's own handler, once training starts,
    checkpoints the next step instead: train/stop_request.py); the handler it replaced, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise Interrupted(signum)

    return signal.signal(signal.SIGTERM, interrupt)


def console_main() -> None:
    """The `aevb-dist` command: `main`, then a quick exit. Tearing down an interpreter that has torch,
    pyarrow and Ray loaded takes ~0.5 s after the work is done and every file is closed; the command skips
    it once the exit handlers have run (multiprocessing's, logging's) and no thread of ours is running."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a reader that has gone away, a closed stream: exit the usual way
        raise SystemExit(code) from None
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        raise SystemExit(code)  # the interpreter's exit joins them
    # Ray's own exit handler disconnects from the cluster, and waits forever for a head that stopped
    # answering: the handlers get a bounded time, then the command exits all the same (its files are closed).
    handlers = threading.Thread(target=compat.run_exit_handlers, name="aevb-exit-handlers", daemon=True)
    handlers.start()
    handlers.join(EXIT_HANDLERS_S)
    if handlers.is_alive():
        print(
            f"aevb-dist: exit handlers (Ray's disconnect) did not finish within {EXIT_HANDLERS_S:g} s; "
            "exiting without them",
            file=sys.stderr,
            flush=True,
        )
    os._exit(code)


EXIT_HANDLERS_S = 10.0


if __name__ == "__main__":
    console_main()
