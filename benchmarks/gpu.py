"""The GPU path, measured in one run: one script for one call on a GPU machine (~8 minutes).

    python benchmarks/gpu.py --mnist DIR [--out DIR] [--train-s 240] [--deadline-s 480] [--tiny]

DIR holds MNIST's IDX .gz files. Printed as it goes:
1. the device, and its matmul peak (fp32, the dtype of every step and of log p(x) here);
2. a check: the captured CUDA-graph step against the eager GPU step, 60 steps, parameters compared;
3. steps/s of the Burda et al. model (784-200-200-50, Adam, dynamic binarization) at M=100 and M=1000:
   an independent plain PyTorch loop (benchmarks/plain.py: nn.Linear layers, closed-form loss; fused Adam; eager,
   then the same loop captured as a CUDA graph, the standard PyTorch recipe), against aevb_dist's Trainer with
   `train.use_gpu=true data.cache_on_device=true` (captured step; and the eager step), ratio to the
   faster plain loop;
4. configs/mnist_burda.yaml trained for as many of the literature's 3,280 epochs as fit in --train-s
   (at the step rate measured in 3), then its test log p(x), K=5000 importance samples on the 10,000
   test images, and that computation's FLOP/s as a fraction of the matmul peak of 1.

The Trainer runs in this process, not under Ray Train: the device image has no Ray, and Ray's wheel
(79 MB) is larger than a device call can carry. `--tiny` runs every part on this machine's CPU with
tiny sizes (a rehearsal: the device call has no surprise). Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from plain import PlainVAE  # noqa: E402  (benchmarks/plain.py: written without aevb_dist)

from aevb_dist.config import load_config  # noqa: E402
from aevb_dist.data.prepare import prepare  # noqa: E402
from aevb_dist.data.reader import ParquetDataset  # noqa: E402
from aevb_dist.data.sources import read_idx  # noqa: E402
from aevb_dist.model.marginal_likelihood import log_marginal_likelihood  # noqa: E402
from aevb_dist.train.device_data import DeviceData  # noqa: E402
from aevb_dist.train.trainer import Trainer  # noqa: E402
from aevb_dist.train.worker import trainer_for_config  # noqa: E402

BURDA = os.path.join(REPO, "configs", "mnist_burda.yaml")
D, H, Z = 784, 200, 50
STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, rows: int, seconds: float = 2.0) -> float:
    """FLOP/s of an fp32 product of the decoder's last layer's shape, [rows, 200] @ [200, 784]."""
    a, b = torch.randn(rows, H, device=device), torch.randn(H, D, device=device)
    out = torch.empty(rows, D, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            torch.mm(a, b, out=out)
        n += 10
        sync(device)
    return n * 2 * rows * H * D / (time.perf_counter() - start)


# -- the independent plain loop ---------------------------------------------------------------
def plain_step(images: torch.Tensor, batch: int, captured: bool):
    """One step of the plain loop, as a callable: the step itself, or the replay of its CUDA graph."""
    device = images.device
    torch.manual_seed(0)
    model = PlainVAE((H, H), Z).to(device)
    # The fastest plain Adam on a GPU: fused (one kernel, graph-safe), as aevb_dist uses there.
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda", capturable=captured)
    num_batches = images.shape[0] // batch
    order = torch.randperm(num_batches * batch, device=device).view(num_batches, batch)
    position = torch.zeros((), dtype=torch.int64, device=device)  # the captured loop's batch counter
    host_position = [0]

    def step():
        if captured:  # the batch's indices chosen on the device, so that the replayed graph moves on
            idx = order.index_select(0, position % num_batches).squeeze(0)
            position.add_(1)
        else:
            idx = order[host_position[0] % num_batches]
            host_position[0] += 1
        x = torch.bernoulli(images.index_select(0, idx).float() / 255.0)
        opt.zero_grad(set_to_none=False)
        model(x).backward()
        opt.step()

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if captured:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph.replay
    return step


def plain_steps_per_s(images: torch.Tensor, batch: int, steps: int, captured: bool) -> float:
    device = images.device
    run = plain_step(images, batch, captured)
    for _ in range(20):
        run()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return steps / (time.perf_counter() - start)


# -- aevb_dist ---------------------------------------------------------------------------------
def burda_config(data: str, runs: str, device: torch.device, *extra: str, config: str = BURDA):
    overrides = [
        f"data.train_uri={data}/train",
        f"data.test_uri={data}/test",
        f"run.storage_uri={runs}",
        f"train.use_gpu={str(device.type == 'cuda').lower()}",
        "data.cache_on_device=true",
    ]
    return load_config(config, overrides + list(extra))


def aevb_steps_per_s(data: str, runs: str, device: torch.device, batch: int, steps: int, *extra: str) -> float:
    """The median steps/s over the log windows after the first (which holds the capture)."""
    cfg = burda_config(
        data,
        runs,
        device,
        f"train.batch_size_per_worker={batch}",
        f"train.max_steps={steps}",
        f"train.log_every_steps={max(steps // 6, 1)}",
        "data.test_uri=null",
        f"checkpoint.every_steps={steps}",
        *extra,
    )
    trainer = trainer_for_config(cfg, device=str(device))
    rows = []
    trainer.fit(on_log=rows.append, on_checkpoint=lambda state, row: None)
    rates = [r["samples_per_s"] / batch for r in rows if r["step"] > max(steps // 6, 1)]
    return float(np.median(rates))


def check_captured_step(data: str, runs: str, device: torch.device) -> None:
    if device.type != "cuda":
        say("check: no GPU, the captured step is not run (the eager device-cache step is, in section 3)")
        return
    trained = {}
    for graph in ("false", "true"):
        cfg = burda_config(
            data,
            runs,
            device,
            "train.max_steps=60",
            "train.log_every_steps=30",
            "data.test_uri=null",
            "checkpoint.every_steps=60",
            f"train.cuda_graph={graph}",
        )
        trainer = trainer_for_config(cfg, device=str(device))
        trainer.fit(on_log=lambda row: None, on_checkpoint=lambda state, row: None)
        trained[graph] = trainer
    assert trained["true"].graphed and not trained["false"].graphed
    worst = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        for a, b in zip(trained["true"].params, trained["false"].params)
    )
    say(
        f"check: captured vs eager GPU step after 60 steps: max relative parameter difference {worst:.2e} "
        f"({'OK' if worst <= 1e-4 else 'DIFFERENT'})"
    )


def attempt(what: str, run):
    """run(), or NaN with the reason printed: a failing part is reported and the other sections still run."""
    try:
        return run()
    except Exception as err:
        say(f"{what} failed: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
        return math.nan


def compiled_steps_per_s(data: str, runs: str, device: torch.device, steps: int) -> float:
    """The captured step with train.compile=true at M=100 (NaN, with the reason printed, if it fails)."""
    start = time.perf_counter()
    rate = attempt(
        "M=100 train.compile=true", lambda: aevb_steps_per_s(data, runs, device, 100, steps, "train.compile=true")
    )
    say(
        f"M=100: aevb_dist captured + train.compile {rate:,.0f} steps/s "
        f"(compiled and captured in {time.perf_counter() - start:.0f} s with the timed steps)"
    )
    return rate


def throughput(images: torch.Tensor, data: str, runs: str, device: torch.device, steps: int) -> dict:
    captured_rate = {}
    for batch in (100, 1000):
        plain_eager = plain_steps_per_s(images, batch, steps, captured=False)
        plain_graph = (
            attempt("plain captured loop", lambda: plain_steps_per_s(images, batch, steps, captured=True))
            if device.type == "cuda"
            else math.nan
        )
        ours_eager = aevb_steps_per_s(data, runs, device, batch, steps, "train.cuda_graph=false")
        ours = (
            attempt(f"M={batch} captured step", lambda: aevb_steps_per_s(data, runs, device, batch, steps))
            if device.type == "cuda"
            else ours_eager
        )
        best_plain = max(plain_eager, 0.0 if math.isnan(plain_graph) else plain_graph)
        captured_rate[batch] = ours
        if batch == 100:
            captured_rate["eager"] = ours_eager
        say(
            f"M={batch}: plain eager {plain_eager:,.0f} steps/s, plain captured {plain_graph:,.0f} steps/s | "
            f"aevb_dist eager {ours_eager:,.0f} steps/s, aevb_dist captured {ours:,.0f} steps/s "
            f"({ours * batch:,.0f} samples/s) | ratio to the faster plain loop {ours / best_plain:.2f}x"
        )
    return captured_rate


def burda(data: str, runs: str, out: str, device: torch.device, epochs: int, k: int, peak: float, *extra: str) -> None:
    cfg = burda_config(
        data,
        runs,
        device,
        f"train.num_epochs={epochs}",
        "train.log_every_steps=60000",
        "train.eval_every_steps=0",
        "checkpoint.every_steps=10000000",
        *extra,
    )
    trainer = trainer_for_config(cfg, device=str(device))
    say(
        f"burda: {epochs} epochs of {trainer.total_steps // max(epochs, 1)} steps (M=100), "
        f"{trainer.total_steps:,} steps {' '.join(extra)}"
    )
    start = time.perf_counter()
    last = trainer.fit(
        on_log=lambda row: say(
            f"  step {row['step']:,} epoch {row['epoch']} train ELBO "
            f"{row['train_elbo']:.2f} ({row['samples_per_s']:,.0f} samples/s)"
        ),
        on_checkpoint=lambda state, row: None,
    )
    elapsed = time.perf_counter() - start
    say(f"burda: trained {epochs} epochs in {elapsed:.0f} s; test ELBO {last['test_elbo']:.2f}")
    torch.save(trainer.vae.state_dict(), os.path.join(out, "burda_model.pt"))
    test_log_px(trainer, data, device, k, peak, f"after {epochs} epochs")


def test_log_px(trainer: Trainer, data: str, device: torch.device, k: int, peak: float, when: str) -> float:
    """The model's test log p(x): K importance samples on every test image (statically binarized, as
    evaluation is), printed with the computation's FLOP/s as a fraction of the matmul peak."""
    test = ParquetDataset(f"{data}/test")
    test_x = DeviceData(test, device, "static", trainer.seed)  # the fixed binarization evaluation uses
    x = test_x.batch(torch.arange(test.num_rows, device=device), test_x.epoch_words(0))
    vae = trainer.vae.eval()
    gen = torch.Generator(device=device).manual_seed(1)
    sync(device)
    start, total = time.perf_counter(), 0.0
    for i in range(0, len(x), 100):
        total += log_marginal_likelihood(vae, x[i : i + 100], k, min(k, 1000), gen).sum().item()
    elapsed = time.perf_counter() - start
    # A multiply-add a weight: the encoder of x once an image, every other network once a sample.
    first = sum(p.numel() for p in (vae.encoders[0] if hasattr(vae, "encoders") else vae.encoder).parameters())
    flops = len(x) * 2 * (k * (sum(p.numel() for p in vae.parameters()) - first) + first)
    say(
        f"burda: test log p(x), K={k}, {len(x)} images: {total / len(x):.2f} nats {when} "
        f"({elapsed:.1f} s, {flops / elapsed / 1e12:.2f} TFLOP/s, fraction_of_peak={flops / elapsed / peak:.2f})"
    )
    return total / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", required=True, help="folder with MNIST's IDX .gz files")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="aevb-gpu-"))
    parser.add_argument("--train-s", type=float, default=240.0, help="seconds for the Burda run's training")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=480.0,
        help="the whole script's time: training is shortened to end 60 s before it",
    )
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal with tiny sizes")
    parser.add_argument("--skip-burda", action="store_true", help="sections 1-3 only")
    args = parser.parse_args()
    device = torch.device("cuda:0" if torch.cuda.is_available() and not args.tiny else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(f"device: {name}; torch {torch.__version__}")
    work = tempfile.mkdtemp(prefix="aevb-gpu-work-")
    data, runs = os.path.join(work, "mnist"), os.path.join(work, "runs")
    prepare(args.mnist, data, num_shards=4, report=lambda m: None)
    images = torch.from_numpy(read_idx(os.path.join(args.mnist, "train-images-idx3-ubyte.gz")).reshape(-1, D).copy())
    images = images.to(device)
    peak = matmul_peak(device, 100_000 if device.type == "cuda" else 2000)
    say(f"matmul peak, fp32 [N, 200] @ [200, 784]: {peak / 1e12:.2f} TFLOP/s")
    attempt("check", lambda: check_captured_step(data, runs, device))
    steps = 3000 if device.type == "cuda" else 30
    rates = throughput(images, data, runs, device, steps)
    compiled = compiled_steps_per_s(data, runs, device, steps)
    if args.skip_burda:
        return
    extra = ("train.compile=true",) if compiled > rates[100] else ()
    if math.isnan(rates[100]):  # the captured step failed: the eager step trains
        extra, rates[100] = ("train.cuda_graph=false",), rates["eager"]
    rate = max(rates[100], 0 if math.isnan(compiled) else compiled)
    train_s = min(args.train_s, args.deadline_s - (time.perf_counter() - STARTED) - 60)
    epochs = 1 if args.tiny else max(1, min(3280, int(train_s * rate / 600)))  # 600 steps an epoch
    burda(data, runs, args.out, device, epochs, 50 if args.tiny else 5000, peak, *extra)
    say("done")


if __name__ == "__main__":
    main()
