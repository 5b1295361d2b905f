"""Training throughput of aevb-dist against plain PyTorch ceilings, measured in the same run.

    python benchmarks/throughput.py [--repeats 3] [--seconds 8] [--batches 100 1000] [--compare-bf16]

The paper's MNIST model (784-500-20, tanh, Bernoulli decoder, SGVB-B, L=1, Adagrad) on real
MNIST with dynamic binarization, M = global minibatch. The ceilings are written independently of
aevb_dist (benchmarks/plain.py: nn.Linear layers and the closed-form loss, no project code):
- plain single process, all cores' threads, data in memory (`torch.bernoulli` per batch);
- plain torch DDP, gloo on 127.0.0.1, 2 processes × 1 thread, data in memory;
- the same 2 processes with a hand-written all-reduce of one flat gradient buffer instead of DDP
  (the 2-worker ceiling is the faster of the two);
- `aevb-dist train` streaming the same data from Parquet, 1 worker and 2 workers, on its
  embedded Ray and in local mode (`ray.local_mode=true`, no Ray cluster): steady
  samples/s from metrics.csv, the wall time from command start to the first step and from the
  last step to exit.
For each aevb-dist case it prints `ratio_vs_ceiling` (1 worker against the single process,
2 workers against the faster 2-process loop): each repeat measures the ceilings, runs every case, and
measures them again; a run's ratio is against the mean of the ceilings just before and after it, and
the printed ratio is the median of the repeats' ratios (samples/s: medians over --repeats runs). With --compare-bf16
it also runs 2 workers with `train.allreduce_dtype=bfloat16` and prints each case's final
train ELBO (same seed, same steps), the measured effect of compressing the all-reduce.
Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from plain import PlainVAE  # benchmarks/plain.py: the ceiling written without aevb_dist

from aevb_dist.data.prepare import prepare
from aevb_dist.data.sources import read_idx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(REPO, "..", "shared", "data", "mnist")


def read_metrics_rows(run_folder: str) -> list[dict]:
    """A finished run's metrics.csv, row by row."""
    with open(os.path.join(run_folder, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def steady_samples_per_s(rows: list[dict]) -> float:
    """A run's steady state from its metrics.csv rows: samples/s between its second and its last log line (the
    first interval holds the warm-up: the first batches read, torch's first calls)."""
    second, last = rows[1], rows[-1]
    return (int(last["samples_seen"]) - int(second["samples_seen"])) / (float(last["time"]) - float(second["time"]))


def mnist_in_memory() -> torch.Tensor:
    return torch.from_numpy(
        read_idx(os.path.join(MNIST, "train-images-idx3-ubyte.gz")).reshape(-1, 784).astype(np.float32) / 255.0
    )


def timed_loop(step, seconds: float = 0.0, warmup: int = 10, num_steps: int = 0) -> float:
    """Steps per second after `warmup` steps, over about `seconds` (or exactly `num_steps`:
    DDP ranks must take the same number of steps)."""
    for _ in range(warmup):
        step()
    start, n = time.perf_counter(), 0
    while (n < num_steps) if num_steps else (time.perf_counter() - start < seconds):
        step()
        n += 1
    return n / (time.perf_counter() - start)


def plain_batches(data: torch.Tensor, batch: int, rank: int = 0, world: int = 1):
    """next_batch(): the rank's next slice of the in-memory data, dynamically binarized."""
    gen = torch.Generator().manual_seed(rank)
    cursor = [rank * batch]

    def next_batch() -> torch.Tensor:
        i = cursor[0] % (data.shape[0] - batch)
        cursor[0] += batch * world
        return torch.bernoulli(data[i : i + batch], generator=gen)

    return next_batch


def make_step(model: torch.nn.Module, data: torch.Tensor, batch: int, rank: int = 0, world: int = 1):
    """One plain training step on `plain_batches`."""
    opt = torch.optim.Adagrad(model.parameters(), lr=0.02)
    next_batch = plain_batches(data, batch, rank, world)

    def step():
        x = next_batch()
        opt.zero_grad(set_to_none=True)
        model(x).backward()
        opt.step()

    return step


def plain_single(data: torch.Tensor, batch: int, seconds: float, threads: int | None = None) -> float:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    return timed_loop(make_step(PlainVAE(), data, batch), seconds) * batch


def make_flat_step(model: torch.nn.Module, data: torch.Tensor, batch: int, rank: int, world: int):
    """A hand-written data-parallel step: the gradients live in one flat buffer (as views), one all-reduce
    sums it, a division makes it the global mean. What DDP does without its hooks and buckets."""
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params))
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    opt = torch.optim.Adagrad(params, lr=0.02)
    next_batch = plain_batches(data, batch, rank, world)

    def step():
        x = next_batch()
        flat.zero_()
        model(x).backward()
        dist.all_reduce(flat)
        flat.div_(world)
        opt.step()

    return step


def _ddp_rank(rank: int, world: int, port: int, batch: int, num_steps: int, out: str, flat: bool) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    if flat:
        step = make_flat_step(PlainVAE(), mnist_in_memory(), batch // world, rank, world)
    else:
        step = make_step(
            torch.nn.parallel.DistributedDataParallel(PlainVAE()), mnist_in_memory(), batch // world, rank, world
        )
    rate = timed_loop(step, num_steps=num_steps) * batch
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(rate))
    # Both ranks leave together: rank 0 hosts the TCP store, and a rank still tearing its group down when
    # the other has exited was seen to abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def plain_ddp(batch: int, num_steps: int, flat: bool = False) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_ddp_rank, args=(2, port, batch, num_steps, out, flat), nprocs=2, join=True)
        return float(open(out).read())


def aevb_train(
    data_uri: str, runs: str, batch: int, workers: int, steps: int, name: str, extra: tuple[str, ...] = ()
) -> dict:
    overrides = [
        f"data.train_uri={data_uri}/train",
        "data.test_uri=",
        "model.input_dim=784",
        "model.hidden_sizes=[500]",
        "model.latent_dim=20",
        "model.activation=tanh",
        "model.likelihood=bernoulli",
        "data.binarization=dynamic",
        "train.estimator=B",
        "train.num_latent_samples=1",
        "optim.name=adagrad",
        "optim.lr=0.02",
        f"train.num_workers={workers}",
        f"train.batch_size_per_worker={batch // workers}",
        f"train.max_steps={steps}",
        f"train.log_every_steps={max(steps // 20, 1)}",
        "train.eval_every_steps=0",
        f"checkpoint.every_steps={steps}",
        f"run.storage_uri={runs}",
        f"run.name={name}",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "aevb_dist", "train", os.path.join(REPO, "configs", "smoke.yaml"), *overrides],
        capture_output=True,
        text=True,
        env=env,
    )
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    rows = read_metrics_rows(os.path.join(runs, name))
    first, last, rate = rows[0], rows[-1], steady_samples_per_s(rows)
    return {
        "samples_per_s": rate,
        "final_train_elbo": float(last["train_elbo"]),
        "start_to_first_step_s": float(first["time"]) - start,
        "last_step_to_exit_s": end - float(last["time"]),
        "wall_s": end - start,
        "compute_s": (int(last["samples_seen"]) - int(first["samples_seen"])) / rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per plain measurement")
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--compare-bf16",
        action="store_true",
        help="also run 2 workers with train.allreduce_dtype=bfloat16 (same seed and steps)",
    )
    args = parser.parse_args()
    data = mnist_in_memory()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(MNIST, f"{tmp}/mnist", split="train", num_shards=8, report=lambda m: None)
        for batch in args.batches:
            # Bracketed pairs: this machine's speed drifts by ±30% within minutes, so each repeat measures the
            # ceilings, runs every aevb-dist case, and measures the ceilings again; a case's ratio is its rate
            # over the mean of the ceilings just before and just after it, and the printed ratio is the median
            # of those ratios over the repeats.
            ceilings: dict[str, list[float]] = {"plain_single": [], "plain_ddp": [], "plain_flat_allreduce": []}

            def measure_ceilings() -> dict[str, float]:
                single = plain_single(data, batch, args.seconds)
                ddp_steps = max(int(args.seconds * 0.7 * single / batch), 20)
                now = {
                    "plain_single": single,
                    "plain_ddp": plain_ddp(batch, ddp_steps),
                    "plain_flat_allreduce": plain_ddp(batch, ddp_steps, flat=True),
                }
                for k, v in now.items():
                    ceilings[k].append(v)
                return now

            local = ("ray.local_mode=true",)
            cases = [(1, (), ""), (2, (), ""), (1, local, "_local"), (2, local, "_local")]
            if args.compare_bf16:
                cases.append((2, ("train.allreduce_dtype=bfloat16",), "_bf16"))
            runs: dict[str, list[dict]] = {f"{w}worker{t}": [] for w, _, t in cases}
            before = measure_ceilings()
            for r in range(args.repeats):
                done = []
                for workers, extra, tag in cases:
                    # The 2-worker ceiling: the faster of the two hand-written 2-process loops.
                    label = (
                        "plain_single"
                        if workers == 1
                        else max(("plain_ddp", "plain_flat_allreduce"), key=lambda k: before[k])
                    )
                    steps = max(int(args.seconds * 1.5 * before[label] / batch), 50)
                    out = aevb_train(
                        f"{tmp}/mnist", f"{tmp}/runs", batch, workers, steps, f"b{batch}_w{workers}{tag}_r{r}", extra
                    )
                    done.append((f"{workers}worker{tag}", label, out, steps))
                after = measure_ceilings()
                for name, label, out, steps in done:
                    out["ceiling"] = (before[label] + after[label]) / 2
                    out["label"], out["steps"] = label, steps
                    runs[name].append(out)
                before = after
            for k, v in ceilings.items():
                print(f"M={batch} {k} samples_per_s={statistics.median(v):,.0f}", flush=True)
            for name, outs in runs.items():
                med = {k: statistics.median(o[k] for o in outs) for k in outs[0] if not isinstance(outs[0][k], str)}
                ratios = [o["samples_per_s"] / o["ceiling"] for o in outs]
                print(
                    f"M={batch} aevb_dist_{name} samples_per_s={med['samples_per_s']:,.0f} "
                    f"ratio_vs_ceiling={statistics.median(ratios):.2f} (vs {outs[0]['label']}; each repeat: "
                    f"{', '.join(f'{x:.2f}' for x in ratios)}) "
                    f"start_to_first_step_s={med['start_to_first_step_s']:.1f} "
                    f"last_step_to_exit_s={med['last_step_to_exit_s']:.1f} "
                    f"overhead_s={med['wall_s'] - med['compute_s']:.1f} "
                    f"final_train_elbo={med['final_train_elbo']:.2f} ({int(med['steps'])} steps)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
