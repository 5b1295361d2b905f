"""Throughput of the importance-sampled log p(x) against the machine's matmul peak, measured in the same run.

    python benchmarks/log_likelihood.py [--num-examples 10000] [--k 5000] [--chunk-sizes 50 100 250]

The paper's MNIST model (784-500-20, tanh, Bernoulli decoder) on the MNIST test images
(binarized once). For each chunk size (importance samples per pass) it times
`log_marginal_likelihood` in this process with all cores' threads, counts the matmul
FLOPs it must do (2·(20·500 + 500·784) per sample in the decoder, the encoder once per
example), and prints the achieved FLOP/s as `fraction_of_peak`, against a dense fp32
matmul of the decoder's inner sizes timed in the same run. With --against-plain it also times,
alternating with it, an importance-sampling loop written by hand without aevb_dist's code
(benchmarks/plain.py `plain_log_px`: the same model sizes, K and chunk) and prints the ratio.
Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from aevb_dist.data.sources import read_idx
from aevb_dist.model.marginal_likelihood import log_marginal_likelihood
from aevb_dist.model.vae import VAE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain import PlainVAE, plain_log_px  # noqa: E402  the ceiling, written without aevb_dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(REPO, "..", "shared", "data", "mnist")
D, H, Z = 784, 500, 20


def matmul_peak(seconds: float = 3.0) -> float:
    """FLOP/s of a large fp32 product, [50000, 500] @ [500, 784]: the decoder's shape at its most efficient."""
    a, b = torch.randn(50_000, H), torch.randn(H, D)
    out = torch.empty(50_000, D)
    for _ in range(2):
        torch.mm(a, b, out=out)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        torch.mm(a, b, out=out)
        n += 1
    return n * 2 * 50_000 * H * D / (time.perf_counter() - start)


def model_flops(num_examples: int, k: int) -> float:
    decoder = 2 * (Z * H + H * D) * k * num_examples
    encoder = 2 * (D * H + H * 2 * Z) * num_examples
    return float(decoder + encoder)


def against_plain(vae: VAE, x_all: torch.Tensor, k: int, chunk: int, batch: int, repeats: int) -> None:
    """examples/s of log_marginal_likelihood and of the hand-written loop, alternating; the median ratio."""
    plain = PlainVAE()
    plain.eval()

    def rate(log_px) -> float:
        gen = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        for i in range(0, len(x_all), batch):
            log_px(x_all[i : i + batch], gen)
        return len(x_all) / (time.perf_counter() - start)

    ratios = []
    for r in range(repeats):
        ours = rate(lambda x, gen: log_marginal_likelihood(vae, x, k, chunk, gen))
        by_hand = rate(lambda x, gen: plain_log_px(plain, x, k, chunk, gen))
        ratios.append(ours / by_hand)
        print(
            f"repeat {r + 1}: aevb_dist {ours:.2f} examples/s, by hand {by_hand:.2f} examples/s, "
            f"ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(
        f"log p(x), K={k}, chunk {chunk}, {len(x_all)} examples: aevb_dist_over_plain="
        f"{statistics.median(ratios):.3f} (median of {repeats})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-examples", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[100])
    parser.add_argument(
        "--against-plain",
        type=int,
        default=0,
        metavar="REPEATS",
        help="time the hand-written loop against ours REPEATS times each, alternating",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    pixels = read_idx(os.path.join(MNIST, "t10k-images-idx3-ubyte.gz")).reshape(-1, D)[: args.num_examples]
    x_all = torch.bernoulli(
        torch.from_numpy(pixels.astype(np.float32) / 255.0), generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(0)
    vae = VAE(D, [H], Z).eval()
    vae.validate_inputs = False
    peak = matmul_peak()
    print(f"matmul peak (fp32, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    flops = model_flops(len(x_all), args.k)
    if args.against_plain:
        against_plain(vae, x_all, args.k, args.chunk_sizes[0], args.batch_size, args.against_plain)
        return
    for chunk in args.chunk_sizes:
        gen = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        total = 0.0
        for i in range(0, len(x_all), args.batch_size):
            total += log_marginal_likelihood(vae, x_all[i : i + args.batch_size], args.k, chunk, gen).sum().item()
        elapsed = time.perf_counter() - start
        print(
            f"log p(x), K={args.k}, {len(x_all)} examples, chunk {chunk}: {elapsed:.1f} s, "
            f"{len(x_all) / elapsed:.1f} examples/s, {flops / elapsed / 1e9:.1f} GFLOP/s, "
            f"fraction_of_peak={flops / elapsed / peak:.2f} (mean log p(x) {total / len(x_all):.2f})"
        )


if __name__ == "__main__":
    main()
