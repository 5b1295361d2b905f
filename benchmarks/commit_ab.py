"""Local mode's start-up at this checkout against another commit's, alternated: a regression check between commits.

    python benchmarks/commit_ab.py BASE [--pairs 6] [--workers 2] [--steps 40]

Checks BASE out in a temporary git worktree, then runs the same short `aevb-dist train` (smoke model, tiny
synthetic data, `ray.local_mode=true`) with each tree's package first on PYTHONPATH, in pairs whose order
alternates, and prints the seconds from the command's start to its first progress line and to its exit, and
the median over pairs of this checkout's time to the first step over BASE's. Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_run(tree: str, data: str, runs: str, workers: int, steps: int) -> tuple[float, float]:
    """(seconds to the first step's line, seconds to exit) of one `aevb-dist train` from `tree`."""
    shutil.rmtree(runs, ignore_errors=True)
    command = [sys.executable, "-m", "aevb_dist", "train", os.path.join(tree, "configs", "smoke.yaml")]
    command += [f"data.train_uri={data}/train", f"data.test_uri={data}/test", "model.input_dim=16"]
    command += [f"train.num_workers={workers}", "ray.local_mode=true", f"run.storage_uri={runs}"]
    command += [f"train.max_steps={steps}"]
    started = time.monotonic()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": tree})
    first = None
    for line in proc.stderr:
        if first is None and line.startswith("step 1/"):
            first = time.monotonic() - started
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"the run from {tree} failed (exit {proc.returncode})")
    return first, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix="aevb-ab-") as tmp:
        base_tree = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-q", base_tree, args.base], check=True)
        try:
            rows = np.random.default_rng(0).random((300, 16), dtype=np.float32)
            np.save(os.path.join(tmp, "x.npy"), rows)
            subprocess.run(
                [sys.executable, "-m", "aevb_dist", "prepare", os.path.join(tmp, "x.npy"), f"{tmp}/data"],
                check=True,
                capture_output=True,
            )
            trees = {f"base {args.base}": base_tree, f"HEAD {head.strip()}": REPO}
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
            for pair in range(args.pairs):
                for name in trees if pair % 2 == 0 else reversed(list(trees)):
                    times[name].append(timed_run(trees[name], f"{tmp}/data", f"{tmp}/runs", args.workers, args.steps))
                print(f"pair {pair}: " + "  ".join(f"{n} {t[-1][0]:.2f} s" for n, t in times.items()), flush=True)
        finally:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", base_tree], check=False)
    for name, pairs in times.items():
        print(
            f"{name}: to the first step median {statistics.median(t[0] for t in pairs):.2f} s, "
            f"to exit median {statistics.median(t[1] for t in pairs):.2f} s"
        )
    base_name, head_name = list(times)
    ratios = [h[0] / b[0] for h, b in zip(times[head_name], times[base_name])]
    print(f"HEAD / base, seconds to the first step, median of paired ratios: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
