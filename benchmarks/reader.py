"""Reader throughput against the training step's consumption rate, measured in the same run.

    python benchmarks/reader.py [--data /tmp/mnist_pq/train] [--batch-size 100]

Prepares MNIST from ../shared/data/mnist if --data is not given. Prints rows/s of the
streaming reader (read + scale + dynamic binarization, background prefetch) and of the
paper's MNIST training step (784-500-20, SGVB-B, Adagrad) on in-memory data, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from aevb_dist.data.reader import EpochStream, ParquetDataset
from aevb_dist.model.elbo import sgvb_b
from aevb_dist.data.prepare import prepare
from aevb_dist.model.vae import VAE


def reader_rows_per_s(ds: ParquetDataset, batch_size: int) -> float:
    start, rows = time.perf_counter(), 0
    for batch in EpochStream(ds, rank=0, world_size=1, batch_size=batch_size, epoch=0, seed=0,
                             binarization="dynamic"):
        rows += len(batch)
    return rows / (time.perf_counter() - start)


def step_rows_per_s(ds: ParquetDataset, batch_size: int, num_steps: int = 200) -> float:
    torch.manual_seed(0)
    vae = VAE(784, [500], 20)
    opt = torch.optim.Adagrad(vae.parameters(), lr=0.02)
    x = (torch.rand(batch_size, 784) < 0.3).float()
    for i in range(num_steps + 10):
        if i == 10:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        (-sgvb_b(vae, x, 1).sum() / batch_size).backward()
        opt.step()
    return num_steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared train split; default: prepare MNIST into a temp folder")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.data
        if uri is None:
            mnist = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")
            prepare(mnist, f"{tmp}/mnist", split="train", report=lambda m: None)
            uri = f"{tmp}/mnist/train"
        ds = ParquetDataset(uri, expected_dim=784)
        reader = reader_rows_per_s(ds, args.batch_size)
        step = step_rows_per_s(ds, args.batch_size)
    print(f"reader_rows_per_s={reader:,.0f} step_rows_per_s={step:,.0f} "
          f"reader_over_step={reader / step:.2f} (torch threads={torch.get_num_threads()})")


if __name__ == "__main__":
    main()
