"""Reader throughput against the training step's consumption rate, measured in the same run.

    python benchmarks/reader.py [--data /tmp/mnist_pq/train] [--batch-size 100] [--encoded 20000]

Prepares MNIST from ../shared/data/mnist if --data is not given. Prints rows/s of the
streaming reader (read + scale + dynamic binarization) and of the
paper's MNIST training step (784-500-20, SGVB-B, Adagrad) on in-memory data, and their ratio.
With --encoded N, the first N images are also written as PNG bytes in the Hugging Face layout
(a struct {bytes, path} column, 1,000-row row groups) and streamed as training streams such data
(`data.image_column`): decoded images/s against the same step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from aevb_dist.data.epoch_stream import EpochStream
from aevb_dist.data.prepare import prepare
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.model.elbo import sgvb_b
from aevb_dist.model.vae import VAE


def reader_rows_per_s(ds: ParquetDataset, batch_size: int) -> float:
    start, rows = time.perf_counter(), 0
    for batch in EpochStream(ds, rank=0, world_size=1, batch_size=batch_size, epoch=0, seed=0, binarization="dynamic"):
        rows += len(batch)
    return rows / (time.perf_counter() - start)


def write_encoded(ds: ParquetDataset, count: int, folder: str) -> str:
    """The first `count` images of `ds` as PNG bytes in Hugging Face's Parquet layout."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows = np.concatenate([ds.read_raw(u).x for u in ds.units])[:count]
    encoded = []
    for i, row in enumerate(rows):
        buf = io.BytesIO()
        Image.fromarray(row.reshape(28, 28)).save(buf, format="PNG")
        encoded.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
    column = pa.array(encoded, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({"image": column}), f"{folder}/train-00000.parquet", row_group_size=1000)
    return folder


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
    parser.add_argument("--encoded", type=int, default=0, help="also stream this many images as PNG bytes")
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
        encoded = None
        if args.encoded:
            encoded = reader_rows_per_s(ParquetDataset(write_encoded(ds, args.encoded, f"{tmp}/png")), args.batch_size)
    print(
        f"reader_rows_per_s={reader:,.0f} step_rows_per_s={step:,.0f} "
        f"reader_over_step={reader / step:.2f} (torch threads={torch.get_num_threads()})"
    )
    if encoded is not None:
        print(
            f"encoded_png_images_per_s={encoded:,.0f} encoded_over_step={encoded / step:.2f} "
            f"({args.encoded:,} images decoded by the reader)"
        )


if __name__ == "__main__":
    main()
