"""Where a training step's time goes, without Ray: the plain loop against `Trainer.fit` in one process.

    python benchmarks/step_profile.py [--batch 100] [--epochs 3] [--repeats 5]

Both use the paper's MNIST model (784-500-20, tanh, Bernoulli, SGVB-B, L=1, Adagrad) and all
cores' threads. The plain loop (benchmarks/plain.py, written without aevb_dist's code) reads in-memory
intensities and binarizes them with `torch.bernoulli`; `Trainer.fit` streams the same data from Parquet
through aevb-dist's reader (hash-seeded dynamic binarization, windows loaded as needed from local files; in
epochs after the first, row groups from its decoded cache) and does everything a training step does (sums all-reduced as
one buffer, a non-finite check, logging). The ratio
`trainer_over_plain` (each repeat against the mean of the plain loop timed just before and just after it; the
median of the repeats) bounds what a 1-worker `aevb-dist train` can reach; the rest of the gap
in benchmarks/throughput.py is Ray's. Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain import PlainVAE  # noqa: E402
from throughput import MNIST, make_step, mnist_in_memory, timed_loop  # noqa: E402

from aevb_dist.config import load_config  # noqa: E402
from aevb_dist.data.prepare import prepare  # noqa: E402
from aevb_dist.train.worker import trainer_for_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer_rates(data_uri: str, batch: int, epochs: int, prefilled: bool = False) -> tuple[float, float]:
    """Samples/s of `Trainer.fit` in its first epoch (every row group read from the files) and in the later
    ones (read from the worker's decoded-row-group cache, `data.decoded_cache_mib`); `prefilled`: every batch
    is read before the clock starts (the reader's share of the cores then costs nothing), the step alone."""
    cfg = load_config(
        os.path.join(REPO, "configs", "smoke.yaml"),
        [
            f"data.train_uri={data_uri}",
            "data.test_uri=",
            "model.input_dim=784",
            "model.hidden_sizes=[500]",
            "model.latent_dim=20",
            "model.likelihood=bernoulli",
            "data.binarization=dynamic",
            "train.estimator=B",
            "optim.name=adagrad",
            "optim.lr=0.02",
            f"train.batch_size_per_worker={batch}",
            f"train.num_epochs={epochs}",
            "train.max_steps=null",
            "checkpoint.every_steps=1000000",
        ],
    )
    trainer = trainer_for_config(cfg)
    per_epoch = trainer.source.num_batches(0)
    trainer.train_cfg.log_every_steps = max(per_epoch // 10, 1)
    if prefilled:
        read = trainer.source.batches
        batches = {e: list(read(trainer.source.stream(e, 0))) for e in range(epochs)}
        trainer.source.batches = lambda stream: iter(batches[stream.epoch][stream.start_batch :])
    times: dict[int, float] = {}
    trainer.fit(
        on_log=lambda row: times.setdefault(row["step"], time.perf_counter()), on_checkpoint=lambda state, row: None
    )
    every = trainer.train_cfg.log_every_steps
    # From the first log row after step 1 (steady state) to the epoch's end, then the later epochs.
    first = (per_epoch - every) * batch / (times[per_epoch] - times[every])
    later = (max(times) - per_epoch) * batch / (times[max(times)] - times[per_epoch])
    return first, later


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    data = mnist_in_memory()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(MNIST, f"{tmp}/mnist", split="train", num_shards=8, report=lambda m: None)
        rates: dict[str, list[float]] = {"plain": [], "trainer": [], "trainer_first_epoch": [], "trainer_prefilled": []}
        ceilings: list[float] = []  # each repeat's: the mean of the plain loop just before and just after it

        def plain() -> float:
            torch.manual_seed(0)
            return timed_loop(make_step(PlainVAE(), data, args.batch), 4.0) * args.batch

        before = plain()
        for _ in range(args.repeats):  # bracketed: this machine's speed drifts by ±30% within minutes
            first, later = trainer_rates(f"{tmp}/mnist/train", args.batch, args.epochs)
            rates["trainer_first_epoch"].append(first)
            rates["trainer"].append(later)
            rates["trainer_prefilled"].append(trainer_rates(f"{tmp}/mnist/train", args.batch, 2, prefilled=True)[1])
            after = plain()
            rates["plain"].append(before)
            ceilings.append((before + after) / 2)
            before = after
    # The median of each repeat's own ratio, against the plain loop measured just before and just after it.
    ratio = {k: statistics.median(o / p for o, p in zip(rates[k], ceilings)) for k in rates if k != "plain"}
    print(
        f"M={args.batch} plain samples_per_s={statistics.median(rates['plain']):,.0f} "
        f"trainer samples_per_s={statistics.median(rates['trainer']):,.0f} "
        f"trainer_over_plain={ratio['trainer']:.3f} (epochs 2-{args.epochs}) "
        f"trainer_first_epoch_over_plain={ratio['trainer_first_epoch']:.3f} "
        f"trainer_prefilled_over_plain={ratio['trainer_prefilled']:.3f} "
        f"(each repeat: {', '.join(f'{o / p:.3f}' for o, p in zip(rates['trainer'], ceilings))})"
    )


if __name__ == "__main__":
    main()
