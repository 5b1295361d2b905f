"""Opening a dataset of many shards on S3: storage requests and seconds, with the dataset's index and
without it, and the time to the first training step.

    python benchmarks/many_shards.py [--shards 4 2000] [--rows 20000]

Starts moto's S3 server on 127.0.0.1, prepares a synthetic uint8 dataset (784 bytes a row, the rows
split into N shards) for each N, then opens it three ways, counting S3 requests (every call s3fs makes):
from its index (what the driver does), from its footers (the index deleted: Parquet written by someone
else), and from the driver's description (what each worker does). Last, `aevb-dist train` in local
mode with 2 workers for 1 step: seconds from the command to the first step, with the index and without.
Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import s3fs  # noqa: E402

from aevb_dist.data.index import INDEX_NAME  # noqa: E402
from aevb_dist.data.prepare import prepare  # noqa: E402
from aevb_dist.data.reader import ParquetDataset  # noqa: E402
from aevb_dist.run import storage  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tests.s3_server import start_moto  # noqa: E402 - the S3 server as the tests start it

REQUESTS = [0]
_call_s3 = s3fs.S3FileSystem._call_s3


async def _counted_call_s3(self, *args, **kwargs):
    REQUESTS[0] += 1
    return await _call_s3(self, *args, **kwargs)


s3fs.S3FileSystem._call_s3 = _counted_call_s3


def opened(uri: str, endpoint: str, **kwargs) -> tuple[ParquetDataset, int, float]:
    REQUESTS[0] = 0
    start = time.perf_counter()
    data = ParquetDataset(uri, endpoint_url=endpoint, **kwargs)
    return data, REQUESTS[0], time.perf_counter() - start


def first_step_s(uri: str, endpoint: str, runs: str, name: str) -> float:
    args = [
        sys.executable,
        "-m",
        "aevb_dist",
        "train",
        os.path.join(REPO, "configs", "smoke.yaml"),
        f"data.train_uri={uri}",
        "data.test_uri=null",
        "model.input_dim=784",
        "train.num_workers=2",
        "train.max_steps=1",
        f"run.storage_uri={runs}",
        f"run.name={name}",
        f"run.s3_endpoint_url={endpoint}",
        "ray.local_mode=true",
    ]
    start = time.time()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    fs, path = storage.resolve(f"{runs}/{name}", endpoint)
    first = fs.cat_file(f"{path}/metrics.csv").decode().splitlines()[1].split(",")
    return float(first[7]) - start  # the row's `time` column


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[4, 2000])
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    proc, endpoint = start_moto("bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            np.save(f"{tmp}/x.npy", np.random.default_rng(0).integers(0, 256, (args.rows, 784), dtype=np.uint8))
            for shards in args.shards:
                uri = f"s3://bench/data{shards}"
                start = time.perf_counter()
                prepare(
                    f"{tmp}/x.npy", uri, num_shards=shards, split="train", endpoint_url=endpoint, report=lambda m: None
                )
                prepared_s = time.perf_counter() - start
                data, indexed_requests, indexed_s = opened(f"{uri}/train", endpoint)
                _, worker_requests, worker_s = opened(f"{uri}/train", endpoint, description=data.describe())
                with_index = first_step_s(f"{uri}/train", endpoint, "s3://bench/runs", f"indexed{shards}")
                fs, path = storage.resolve(f"{uri}/train", endpoint)
                fs.rm(f"{path}/{INDEX_NAME}")
                _, footer_requests, footer_s = opened(f"{uri}/train", endpoint)
                without = first_step_s(f"{uri}/train", endpoint, "s3://bench/runs", f"footers{shards}")
                print(
                    f"{shards} shards ({len(data.units)} row groups, prepared in {prepared_s:.1f} s): "
                    f"open from the index {indexed_requests} requests {indexed_s:.2f} s | from the footers "
                    f"{footer_requests} requests {footer_s:.2f} s | a worker from the driver's description "
                    f"{worker_requests} requests {worker_s:.3f} s | first step of a 2-worker local-mode run: "
                    f"{with_index:.1f} s with the index, {without:.1f} s without",
                    flush=True,
                )
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
