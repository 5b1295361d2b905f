"""What each `aevb-dist` command does with its parsed arguments. Heavy imports happen inside each command,
so `--help` is fast."""

from __future__ import annotations

import argparse
import os
import sys


def config_command(args: argparse.Namespace) -> int:
    from aevb_dist.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def train_command(args: argparse.Namespace) -> int:
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


def sweep_command(args: argparse.Namespace) -> int:
    from aevb_dist.config import load_config
    from aevb_dist.sweep.driver import sweep

    sweep(load_config(args.config, args.overrides), args.space, _sweep_options(args))
    return 0


def prepare_command(args: argparse.Namespace) -> int:
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


def evaluate_command(args: argparse.Namespace) -> int:
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


def encode_command(args: argparse.Namespace) -> int:
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


def plot_command(args: argparse.Namespace) -> int:
    from aevb_dist.eval.plotting import plot_run

    for uri in plot_run(args.run_uri, args.output, endpoint_url=args.s3_endpoint_url, data_uri=args.data):
        print(uri)
    return 0


def variance_command(args: argparse.Namespace) -> int:
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


def quickstart_command(args: argparse.Namespace) -> int:
    from aevb_dist.cli.quickstart import quickstart

    quickstart(args.output, args.dataset)
    return 0


def submit_command(args: argparse.Namespace) -> int:
    from aevb_dist.cluster.submit import submit
    from aevb_dist.config import load_config

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


def jobs_command(args: argparse.Namespace) -> int:
    from aevb_dist.cluster.submit import jobs

    return jobs(args.action, args.job_id, args.address)
