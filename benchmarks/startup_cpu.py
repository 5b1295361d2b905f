"""Where a short `aevb-dist train` spends its start-up: CPU seconds of every process it starts.

    python benchmarks/startup_cpu.py [--steps 20] [--workers 1]

Runs the smoke model on real MNIST for a few steps, on the embedded Ray and in Ray Train's
local mode (`ray.local_mode=true`), and polls /proc every 50 ms for the CPU time (user + system)
of the command and all its descendants. Prints, per mode, the wall time from command start to
the first step and from the last step to exit, the CPU seconds per process kind (Ray names its
actor processes `ray::<Class>`), their sum, and that sum divided by the machine's cores: the
least wall time the start-up could take if every process overlapped perfectly. Processes that
exit between two polls lose at most 50 ms of CPU time each. Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import subprocess
import sys
import tempfile
import time

import psutil

from aevb_dist.data.prepare import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(REPO, "..", "shared", "data", "mnist")


def kind(p: psutil.Process) -> str:
    text = " ".join(p.cmdline())
    if text.startswith("ray::"):
        return text.split()[0]
    if "forkserver" in text:  # a forked worker keeps its server's command line
        return "local-mode worker" if "forkserver" in " ".join(p.parent().cmdline()) else "fork server"
    for name in ("gcs_server", "/raylet ", "resource_tracker", "aevb_dist train"):
        if name in text:
            return name
    scripts = [os.path.basename(a) for a in p.cmdline() if a.endswith(".py")]
    return scripts[0] if scripts else p.name()


def measure(data: str, runs: str, name: str, steps: int, workers: int, extra: list[str]) -> dict:
    args = [
        sys.executable,
        "-m",
        "aevb_dist",
        "train",
        os.path.join(REPO, "configs", "smoke.yaml"),
        f"data.train_uri={data}/train",
        "data.test_uri=",
        "train.eval_every_steps=0",
        f"run.storage_uri={runs}",
        f"run.name={name}",
        f"train.max_steps={steps}",
        "train.log_every_steps=1",
        f"checkpoint.every_steps={steps}",
        f"train.num_workers={workers}",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    root = psutil.Process(proc.pid)
    cpu: dict[int, tuple[str, float]] = {}
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                with p.oneshot():
                    times = p.cpu_times()
                    cpu[p.pid] = (kind(p), times.user + times.system)  # Ray workers rename themselves
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(0.05)
    err = proc.stderr.read()
    end = time.time()
    if proc.wait() != 0:
        raise RuntimeError(err[-3000:])
    rows = list(csv.DictReader(open(os.path.join(runs, name, "metrics.csv"))))
    by_kind = collections.Counter()
    for what, seconds in cpu.values():
        by_kind[what] += seconds
    return {
        "start_to_first_step_s": float(rows[0]["time"]) - start,
        "last_step_to_exit_s": end - float(rows[-1]["time"]),
        "cpu_by_kind": by_kind,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        prepare(MNIST, f"{tmp}/mnist", split="train", num_shards=8, report=lambda m: None)
        for label, extra in (("embedded_ray", []), ("local_mode", ["ray.local_mode=true"])):
            r = measure(f"{tmp}/mnist", f"{tmp}/runs", label, args.steps, args.workers, extra)
            total = sum(r["cpu_by_kind"].values())
            print(
                f"{label} workers={args.workers} start_to_first_step_s={r['start_to_first_step_s']:.1f} "
                f"last_step_to_exit_s={r['last_step_to_exit_s']:.1f} cpu_s_total={total:.1f} "
                f"cpu_s_over_{cores}_cores={total / cores:.1f}",
                flush=True,
            )
            for what, seconds in r["cpu_by_kind"].most_common():
                if seconds >= 0.05:
                    print(f"    {seconds:5.2f} s  {what}", flush=True)


if __name__ == "__main__":
    main()
