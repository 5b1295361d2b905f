"""Every command and every argument is explained by --help; --version works."""

import argparse
import subprocess
import sys

from aevb_dist import __version__
from aevb_dist.cli.parser import build_parser


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_argument_has_help():
    parser, commands = subparsers()
    assert {"quickstart", "prepare", "train", "evaluate", "encode", "plot", "variance", "config"} <= set(commands)
    for name, sub in [("aevb-dist", parser), *commands.items()]:
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), f"{name}: {action.dest} has no help"


def test_help_and_version_run():
    out = subprocess.run([sys.executable, "-m", "aevb_dist", "--help"], capture_output=True, text=True, check=True)
    assert "quickstart" in out.stdout and "evaluate" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "aevb_dist", "evaluate", "--help"], capture_output=True, text=True, check=True
    )
    assert "--num-importance-samples" in out.stdout
    out = subprocess.run([sys.executable, "-m", "aevb_dist", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"aevb-dist {__version__}"
