"""Cost of logging one metrics row as metrics.csv grows, against rewriting the whole file per row.

    python benchmarks/run_log.py [--rows 1000 10000 100000] [--appends 20]

For each size, fills a RunLog to that many rows, then times `--appends` more `append` calls:
on local disk (appended in place) and on fsspec's in-memory filesystem (an object store's
stand-in: whole-file uploads, at most one per `upload_interval_s`, timed apart), against a baseline measured
in the same run that formats and writes the whole file at every row (what RunLog did before).
Also times the driver's progress reader (`MetricsTail.new_rows`) after one new row against
parsing the whole file. Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

from aevb_dist.run import storage
from aevb_dist.run.metrics import MetricsTail, RunLog, _csv_text, read_metrics


def row(step: int) -> dict:
    return {
        "step": step,
        "epoch": 0,
        "samples_seen": 100 * step,
        "train_elbo": -100.0 - step * 1e-6,
        "test_elbo": math.nan,
        "samples_per_s": 20000.0,
        "skipped_steps": 0,
        "time": 1.7e9 + step,
    }


def ms_per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--appends", type=int, default=20)
    args = parser.parse_args()
    for n in args.rows:
        rows = [row(s) for s in range(1, n + 1)]
        with tempfile.TemporaryDirectory() as tmp:
            fs, path = storage.resolve(f"{tmp}/seed/metrics.csv")
            fs.makedirs(f"{tmp}/seed", exist_ok=True)
            fs.pipe_file(path, _csv_text(rows, header=True).encode())
            results = {}
            for label, uri in (("local", tmp), ("object_store", f"memory://aevb-bench-{n}")):
                rfs, rpath = storage.resolve(f"{uri}/run")
                rfs.makedirs(rpath, exist_ok=True)
                rfs.pipe_file(f"{rpath}/metrics.csv", fs.cat_file(path))
                log = RunLog(storage.Folder.open(f"{uri}/run"), resume_step=n)
                log._tb = None  # TensorBoard's cost does not grow with the file
                step = [n]

                def append():
                    step[0] += 1
                    log.append(row(step[0]))

                results[label] = ms_per_call(append, args.appends)
                if label == "object_store":
                    results["upload"] = ms_per_call(log._upload, 1)
                    rfs.rm(rpath, recursive=True)
            grown = list(rows)

            def rewrite_whole():
                grown.append(row(len(grown) + 1))
                fs.pipe_file(path, _csv_text(grown, header=True).encode())

            baseline = ms_per_call(rewrite_whole, args.appends)
            tail = MetricsTail(fs, path)
            tail.new_rows()
            with open(path, "a") as f:
                f.write(_csv_text([row(len(grown) + 1)]))
            tail_ms = ms_per_call(tail.new_rows, 1)
            whole_ms = ms_per_call(lambda: read_metrics(fs, path), 1)
        print(
            f"rows={n:,} append_ms local={results['local']:.3f} object_store={results['object_store']:.3f} "
            f"(+{results['upload']:.1f} per upload, at most one per 10 s) "
            f"rewrite_whole_baseline={baseline:.1f} speedup_local={baseline / results['local']:,.0f}x | "
            f"progress_read_ms tail={tail_ms:.3f} whole_file={whole_ms:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
