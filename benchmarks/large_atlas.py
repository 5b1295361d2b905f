"""Memory stays flat for atlases: prepare a synthetic atlas sorted by cell type, stream one epoch of it with 2
worker processes as training workers do, and print each worker's peak RSS, for two atlas sizes, so that growth
with the number of cells would show.

    python benchmarks/large_atlas.py [--cells 200000 2000000] [--genes 2000] [--workers 2] [--within 0.10]

Each atlas: --cells cells × --genes genes of counts drawn per cell from its type's gene profile (16 types,
sorted by type as atlases come; ~100 counts a cell, so ~5% of the entries are non-zero), saved as a
scipy.sparse .npz and converted by `aevb_dist.data.prepare` (--format npz, 16 shards, its storage order's
shuffle through buckets of 50,000 cells). Each worker opens the training split from the driver's description
and streams its part of epoch 0 (`BatchSource.batches`: the reader, the shuffle window, each batch made dense
as a float32 tensor; train.batch_size_per_worker=128), without the decoded-row-group cache (data.decoded_cache_mib
adds its fixed budget to every size alike).
Each reports cells, seconds, RSS once the dataset is open and its peak RSS (VmHWM). Exits 1 where the larger
atlas's worker peak passes the smaller's by more than --within. Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.large_dataset import peak_rss_mb, rss_mb, spawn_workers  # noqa: E402

NUM_TYPES, CHUNK = 16, 100_000


def make_atlas(cells: int, genes: int, folder: str) -> tuple[str, float]:
    """The sorted atlas as an .npz (built a chunk of cells at a time), then prepared; (train URI, seconds)."""
    from scipy import sparse

    from aevb_dist.data.prepare import prepare

    rng = np.random.default_rng(0)
    profiles = rng.gamma(0.3, 1.0, size=(NUM_TYPES, genes))
    profiles /= profiles.sum(1, keepdims=True)
    types = np.sort(rng.integers(NUM_TYPES, size=cells))
    parts = []
    for start in range(0, cells, CHUNK):
        chunk_types = types[start : start + CHUNK]
        library = rng.poisson(100, size=len(chunk_types)) + 1
        rows = np.repeat(np.arange(len(chunk_types)), library)
        gene_of_count = np.empty(len(rows), np.int64)
        for t in np.unique(chunk_types):
            here = chunk_types[rows] == t
            gene_of_count[here] = rng.choice(genes, size=int(here.sum()), p=profiles[t])
        counts = sparse.coo_matrix(
            (np.ones(len(rows), np.int32), (rows, gene_of_count)), shape=(len(chunk_types), genes)
        ).tocsr()  # duplicates summed: each gene's count in the cell
        parts.append(counts)
    source = os.path.join(folder, "atlas.npz")
    sparse.save_npz(source, sparse.vstack(parts).tocsr(), compressed=False)
    del parts
    started = time.perf_counter()
    prepare(source, os.path.join(folder, "pq"), num_shards=16, report=lambda m: None)
    os.remove(source)
    return os.path.join(folder, "pq", "train"), time.perf_counter() - started


def stream_epoch(rank: int, world_size: int, uri: str, genes: int, description: dict, results) -> None:
    import torch

    from aevb_dist.config import load_config
    from aevb_dist.train.datasets import batch_source_for, open_datasets

    torch.set_num_threads(1)
    overrides = [f"data.train_uri={uri}", f"model.input_dim={genes}", "train.batch_size_per_worker=128"]
    overrides.append("data.decoded_cache_mib=0")  # its budget is a fixed size: what grows with the cells is the rest
    cfg = load_config(os.path.join(REPO, "configs/single_cell_nb.yaml"), overrides + ["data.test_uri=null"])
    data, _ = open_datasets(cfg, description)
    source = batch_source_for(cfg, data, rank=rank, world_size=world_size, device=torch.device("cpu"))
    opened = rss_mb()
    cells, start = 0, time.perf_counter()
    for batch in source.batches(source.stream(0, 0)):
        cells += batch.x_BD.shape[0]
    seconds = time.perf_counter() - start
    results.put({"rank": rank, "cells": cells, "seconds": seconds, "opened_mb": opened, "peak_mb": peak_rss_mb()})


def run_workers(uri: str, genes: int, workers: int) -> tuple[int, list[dict]]:
    from aevb_dist.data.reader import ParquetDataset

    data = ParquetDataset(uri, expected_dim=genes)
    return data.num_rows, spawn_workers(stream_epoch, workers, uri, genes, data.describe())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--within", type=float, default=0.10)
    args = parser.parse_args()
    print(f"{args.workers} worker processes; {args.genes:,} genes; sorted by cell type; batches of 128 per worker")
    print(f"{'train cells':>11} {'prepare s':>9} {'cells/s':>9} {'after open MB':>14} {'peak RSS MB':>12}")
    peaks = []
    for cells in args.cells:
        with tempfile.TemporaryDirectory(prefix="aevb-atlas-") as folder:
            uri, prepare_s = make_atlas(cells, args.genes, folder)
            train_cells, got = run_workers(uri, args.genes, args.workers)
            assert sum(r["cells"] for r in got) == train_cells, got  # every cell streamed once
            rate = train_cells / max(r["seconds"] for r in got)
            opened = "/".join(f"{r['opened_mb']:.0f}" for r in got)
            peak = "/".join(f"{r['peak_mb']:.0f}" for r in got)
            peaks.append(max(r["peak_mb"] for r in got))
            print(f"{train_cells:>11,} {prepare_s:>9.0f} {rate:>9,.0f} {opened:>14} {peak:>12}", flush=True)
    growth = peaks[-1] / peaks[0] - 1
    ok = growth <= args.within
    print(
        f"worker peak RSS, largest atlas against the smallest: {growth:+.1%} ({'within' if ok else 'OVER'} "
        f"{args.within:.0%})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
