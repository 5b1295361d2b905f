"""Memory stays flat at scale: stream one epoch of a dataset larger than a worker's memory budget and
print each worker's peak RSS, for two dataset sizes, so that growth with the dataset would show.

    python benchmarks/large_dataset.py [--rows 500000 5000000] [--workers 2] [--bound-gb 1.5]

For each size: a synthetic uint8 dataset of 784-byte rows (5 M rows: 3.9 GB of pixels, 90% of them in the
training split) is prepared with `aevb_dist.data.prepare` into a temporary folder (64 shards, row groups of
1,000 rows), then W worker processes each stream their part of epoch 0 exactly as a training worker does
(`BatchSource.batches`: reader, shuffle window, the decoded-row-group cache at its default 512 MiB, dynamic
binarization, float32 batches as torch tensors), in both data modes: per-worker batches
(train.batch_size_per_worker=100) and global batches (train.global_batch_size=200 over the default 16
partitions, each rank holding one stream per partition it owns). Each worker reports rows, seconds and its
peak RSS (VmHWM, which includes torch and pyarrow themselves: the "after imports" column is RSS once the
dataset is open). Exits 1 if any worker's peak passes --bound-gb. Run by hand, not in CI (the 5 M-row dataset
takes a few minutes to prepare and 4 GB of disk).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DIM = 784
MODES = {"per-worker batch": ["train.batch_size_per_worker=100"], "global batch": ["train.global_batch_size=200"]}


def make_dataset(rows: int, folder: str, shards: int) -> str:
    """A uint8 .npy written in chunks (never whole in memory here), prepared into sharded Parquet."""
    from aevb_dist.data.prepare import prepare

    source = os.path.join(folder, "x.npy")
    pixels = np.lib.format.open_memmap(source, mode="w+", dtype=np.uint8, shape=(rows, 28, 28))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 250_000):
        stop = min(rows, start + 250_000)
        pixels[start:stop] = rng.integers(0, 256, size=(stop - start, 28, 28), dtype=np.uint8)
    pixels.flush()
    del pixels
    out = os.path.join(folder, "pq")
    prepare(source, out, num_shards=shards, split="train", rows_per_row_group=1000, report=lambda m: None)
    os.remove(source)
    return os.path.join(out, "train")


def peak_rss_mb() -> float:
    """VmHWM: this process image's peak RSS. (Not getrusage's ru_maxrss, which Linux carries across the
    fork and exec that start a spawned process: it would report this script's own peak, the prepare step.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stream_epoch(rank: int, world_size: int, uri: str, description: dict, overrides: list, results) -> None:
    import torch

    from aevb_dist.config import load_config
    from aevb_dist.train.datasets import batch_source_for, open_datasets

    torch.set_num_threads(1)
    cfg = load_config(None, [f"data.train_uri={uri}", f"model.input_dim={DIM}", *overrides])
    data, _ = open_datasets(cfg, description)  # as a training worker opens it: data.decoded_cache_mib included
    # As a worker's: the config's binarization (dynamic, for the default Bernoulli model), on the CPU.
    source = batch_source_for(cfg, data, rank=rank, world_size=world_size, device=torch.device("cpu"))
    opened = rss_mb()
    rows, start = 0, time.perf_counter()
    for batch in source.batches(source.stream(0, 0)):
        rows += batch.x_BD.shape[0]
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    results.put({"rank": rank, "rows": rows, "seconds": seconds, "opened_mb": opened, "peak_mb": peak})


def run_workers(uri: str, workers: int, overrides: list) -> tuple[int, list[dict]]:
    """(the training split's rows, each worker's report)."""
    from aevb_dist.data.reader import ParquetDataset

    data = ParquetDataset(uri, expected_dim=DIM)
    # The driver's description, handed to the workers.
    return data.num_rows, spawn_workers(stream_epoch, workers, uri, data.describe(), overrides)


def spawn_workers(target, workers: int, *args) -> list[dict]:
    """`target(rank, workers, *args, results)` in `workers` spawned processes: each one's report, by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, workers, *args, results)) for r in range(workers)]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a worker failed (exit code {p.exitcode})")
    return sorted(out, key=lambda r: r["rank"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[500_000, 5_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--bound-gb", type=float, default=1.5)
    args = parser.parse_args()
    print(f"{args.workers} worker processes; {DIM}-byte uint8 rows; bound {args.bound_gb} GB per worker")
    print(f"{'train rows':>10} {'GB':>5} {'mode':>17} {'rows/s':>9} {'after imports MB':>17} {'peak RSS MB':>12}")
    worst = 0.0
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="aevb-large-") as folder:
            t0 = time.perf_counter()
            uri = make_dataset(rows, folder, args.shards)
            print(f"  (prepared {rows:,} rows in {time.perf_counter() - t0:.0f} s)", flush=True)
            for mode, overrides in MODES.items():
                train_rows, got = run_workers(uri, args.workers, overrides)
                assert sum(r["rows"] for r in got) == train_rows, got  # every row streamed once
                rate = train_rows / max(r["seconds"] for r in got)
                opened = "/".join(f"{r['opened_mb']:.0f}" for r in got)
                peaks = "/".join(f"{r['peak_mb']:.0f}" for r in got)
                worst = max([worst] + [r["peak_mb"] for r in got])
                print(
                    f"{train_rows:>10,} {train_rows * DIM / 1e9:>5.2f} {mode:>17} {rate:>9,.0f} "
                    f"{opened:>17} {peaks:>12}",
                    flush=True,
                )
    ok = worst <= args.bound_gb * 1024
    print(f"largest worker peak: {worst:,.0f} MB — {'within' if ok else 'OVER'} the {args.bound_gb} GB bound")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
