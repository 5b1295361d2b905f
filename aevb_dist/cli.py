"""The `aevb-dist` command line. Heavy imports happen inside each command, so `--help` is fast.

A user mistake prints one line and exits 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from aevb_dist import __version__


def _cmd_config(args: argparse.Namespace) -> int:
    from aevb_dist.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from aevb_dist.config import load_config
    from aevb_dist.ray_launcher import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from aevb_dist.prepare import prepare

    prepare(args.source, args.output_uri, fmt=args.format, num_shards=args.num_shards, split=args.split,
            overwrite=args.overwrite, rows_per_row_group=args.rows_per_row_group, seed=args.seed,
            test_fraction=args.test_fraction)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aevb-dist",
        description="Distributed Auto-Encoding Variational Bayes (Kingma & Welling, 2013) on Ray Train.")
    parser.add_argument("--version", action="version", version=f"aevb-dist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML config file (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. train.num_workers=2 run.name=exp1")

    p = sub.add_parser("config", help="print the resolved, validated config")
    add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("train", help="train a VAE with data-parallel Ray Train workers (resumes a run of the same name)")
    add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("prepare", help="convert MNIST/Fashion-MNIST IDX, Frey Face .mat or .npy/.npz to sharded Parquet")
    p.add_argument("source", help="a folder of IDX .gz files, a .mat file, or a .npy/.npz file")
    p.add_argument("output_uri", help="where to write OUTPUT_URI/train/part-*.parquet and OUTPUT_URI/test/...")
    p.add_argument("--format", choices=["auto", "mnist", "fashion-mnist", "frey-face", "npy"], default="auto",
                   help="source format (default: guessed from the source)")
    p.add_argument("--num-shards", type=int, default=4, help="Parquet files per split (default 4)")
    p.add_argument("--split", choices=["train", "test", "both"], default="both", help="which splits to write")
    p.add_argument("--rows-per-row-group", type=int, default=1000,
                   help="rows per Parquet row group, the reader's unit of work (default 1000)")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="test share for sources without a split (Frey Face, .npy), default 0.1")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split for sources without one")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at OUTPUT_URI")
    p.set_defaults(func=_cmd_prepare)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        if args.debug:
            raise
        print(f"aevb-dist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aevb-dist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
