"""What the fault-injection tests share: a run slow enough to interrupt, waiting for it, finding its
processes, and checking what it left behind."""

import os
import time

import psutil

from aevb_dist import storage
from aevb_dist.run_log import read_metrics

# A run slow enough to be interrupted part way: wider layers, many steps.
SLOW = {"model.hidden_sizes": "[256,256]", "train.batch_size_per_worker": 64, "train.max_steps": 600,
        "train.log_every_steps": 10, "train.eval_every_steps": 0, "checkpoint.every_steps": 100}


def wait_for(predicate, timeout=120.0, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    raise TimeoutError("condition not reached")


def logged_step(run_dir: str) -> int:
    fs, path = storage.resolve(run_dir)
    try:
        rows = read_metrics(fs, f"{path}/metrics.csv")
    except Exception:
        return 0
    return rows[-1]["step"] if rows else 0


def our_train_workers():
    me = psutil.Process(os.getpid())
    return [p for p in me.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline()[:1])]


def check_metrics_contiguous(run_dir: str, every: int, last: int) -> None:
    fs, path = storage.resolve(run_dir)
    steps = [r["step"] for r in read_metrics(fs, f"{path}/metrics.csv")]
    assert steps == [1, *range(every, last + 1, every)], steps


def our_local_workers():
    """Local mode's worker processes: children of this process's fork server."""
    servers = [p for p in psutil.Process(os.getpid()).children() if "forkserver" in " ".join(p.cmdline())]
    return [c for s in servers for c in s.children()]


def capture_errors(errors, fn, *args):
    try:
        fn(*args)
    except BaseException as err:  # noqa: BLE001 - reported to the test thread
        errors.append(err)
