"""1 worker on the embedded Ray against `ray.local_mode=true`, alternated, against the plain ceiling.

    python benchmarks/embedded_vs_local.py [--repeats 3] [--batch 100] [--steps 3000] [--threads 1]

The cell of the performance table (docs/performance.md) that misses 0.95× (embedded Ray, 1 worker, M=100), measured
the way that separates the machine's drift from the launchers' difference: each repeat measures the plain
ceiling (benchmarks/plain.py, 1 process × 2 threads), runs `aevb-dist train` on the embedded Ray, then in
local mode, and measures the ceiling again. Printed per repeat: each launcher's steady-state rate (between
the first and the last progress line) over the mean of the two ceilings, and embedded over local — the
ratio that the machine's drift, which moves both, affects least. Run by hand, not in CI.

--threads 1: the worker and the ceiling each take 1 of the 2 cores (`train.cpus_per_worker=1`, 1 torch thread),
leaving the other to the embedded Ray's own processes: whether the gap is theirs (their wake-ups preempting a
compute thread that the other compute thread then waits for) rather than the worker's code.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from throughput import MNIST, aevb_train, mnist_in_memory, plain_single

from aevb_dist.data.prepare import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per plain measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the worker and the ceiling")
    args = parser.parse_args()
    extra = (f"train.cpus_per_worker={args.threads}",) if args.threads else ()
    data = mnist_in_memory()
    ratios: dict[str, list[float]] = {"embedded": [], "local": [], "embedded/local": []}
    with tempfile.TemporaryDirectory() as tmp:
        prepare(MNIST, f"{tmp}/mnist", split="train", num_shards=8, report=lambda m: None)
        for rep in range(args.repeats):
            before = plain_single(data, args.batch, args.seconds, args.threads)
            embedded = aevb_train(f"{tmp}/mnist", f"{tmp}/runs", args.batch, 1, args.steps, f"e{rep}", extra)
            local = aevb_train(
                f"{tmp}/mnist", f"{tmp}/runs", args.batch, 1, args.steps, f"l{rep}", ("ray.local_mode=true", *extra)
            )
            embedded, local = embedded["samples_per_s"], local["samples_per_s"]
            after = plain_single(data, args.batch, args.seconds, args.threads)
            ceiling = (before + after) / 2
            ratios["embedded"].append(embedded / ceiling)
            ratios["local"].append(local / ceiling)
            ratios["embedded/local"].append(embedded / local)
            print(
                f"repeat {rep}: ceiling {before:,.0f} / {after:,.0f} samples/s | embedded {embedded:,.0f} "
                f"({embedded / ceiling:.3f}x) | local mode {local:,.0f} ({local / ceiling:.3f}x) | "
                f"embedded/local {embedded / local:.3f}",
                flush=True,
            )
    print(
        f"M={args.batch}, 1 worker, {args.threads or 'all'} thread(s), medians of {args.repeats}: "
        + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in ratios.items())
    )


if __name__ == "__main__":
    main()
