"""The `aevb-dist` command line's arguments: one sub-parser per command, each bound to its function in
`commands.py`."""

from __future__ import annotations

import argparse

from aevb_dist import __version__, names
from aevb_dist.cli import commands


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
    p.set_defaults(func=commands.quickstart_command)

    p = sub.add_parser("config", help="print the resolved, validated config")
    add_config_args(p)
    p.set_defaults(func=commands.config_command)

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
    p.set_defaults(func=commands.train_command)

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
    p.set_defaults(func=commands.sweep_command)

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
    p.set_defaults(func=commands.prepare_command)

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
    p.set_defaults(func=commands.submit_command)

    p = sub.add_parser("jobs", help="list, status, logs, follow or stop Ray Jobs")
    p.add_argument("action", choices=["list", "status", "logs", "follow", "stop"], help="what to do")
    p.add_argument("job_id", nargs="?", default=None, help="the job id printed by `aevb-dist submit`")
    p.add_argument(
        "--address",
        default=None,
        help="the Ray job server, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS or 127.0.0.1:8265)",
    )
    p.set_defaults(func=commands.jobs_command)

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
    p.set_defaults(func=commands.evaluate_command)

    p = sub.add_parser("encode", help="write the posterior q(z|x) (mean, std) of every example as Parquet")
    p.add_argument("checkpoint_uri", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("data_uri", help="a Parquet dataset split")
    p.add_argument("output_uri", help="where to write part-*.parquet with index, label, mean, std")
    p.add_argument("--seed", type=int, default=0, help="seed of the binarization for Bernoulli models")
    p.add_argument("--overwrite", action="store_true", help="replace what is at OUTPUT_URI")
    add_cluster_args(p)
    p.set_defaults(func=commands.encode_command)

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
    p.set_defaults(func=commands.plot_command)

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
    p.set_defaults(func=commands.variance_command)
    return parser
