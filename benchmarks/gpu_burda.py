"""Burda et al.'s VAE trained as they trained it, on one GPU, resumable across device calls.

    python benchmarks/gpu_burda.py --mnist DIR --run DIR [--stop-after-s 520] [--k 5000] [--tiny]
        [--config configs/mnist_burda_2layer.yaml] [key=value ...]

configs/mnist_burda.yaml: 784-200-200-50 tanh, Bernoulli, dynamic binarization, M=100, Adam with
ε = 1e-4 and Burda et al.'s learning-rate stages (`optim.lr_schedule=burda2015`: 3^i epochs at
0.001·10^(−i/7), i = 0…7), 3,280 epochs = 1.97 M steps; trained by aevb_dist's Trainer with the
captured, compiled GPU step (`train.use_gpu=true data.cache_on_device=true train.compile=true`).

A device call is at most 600 s, and the whole schedule takes ~540 s of steps on an H100. So the run stops
itself after --stop-after-s, with a checkpoint in the run folder --run: it is the product's own worker
(`worker.run_worker`, in one process) with its checkpoint sink, stopped by the product's stop request
(`stop_request`), and the same command with the same --run resumes it from there. When all 3,280 epochs are
done it prints the test ELBO and the test log p(x) with K importance samples on the 10,000 test images
(benchmarks/gpu.py: test_log_px). `--tiny` rehearses it on this machine's CPU: 3 epochs of a small model,
stopping once on the way. The table's other rows: `--config` another config (the two-layer models of
configs/mnist_burda_2layer.yaml) and `key=value` overrides (`train.estimator=iwae train.num_latent_samples=50`;
`train.cuda_graph=false` where the captured step cannot serve the optimizer). Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpu import BURDA, burda_config, matmul_peak, say, test_log_px  # noqa: E402

from aevb_dist.config import load_config  # noqa: E402
from aevb_dist.data.prepare import prepare  # noqa: E402
from aevb_dist.data.reader import ParquetDataset  # noqa: E402
from aevb_dist.eval import saved_model  # noqa: E402
from aevb_dist.run import checkpoint, storage  # noqa: E402
from aevb_dist.run.metrics import ProgressPrinter, read_metrics  # noqa: E402
from aevb_dist.train import stop_request  # noqa: E402
from aevb_dist.train.driver import plan_run  # noqa: E402
from aevb_dist.train.run_folder_sink import WriteToRunFolder  # noqa: E402
from aevb_dist.train.worker import WorkerContext, WorkerSpec, run_worker  # noqa: E402

TINY = ("train.num_epochs=3", "model.hidden_sizes=[20,20]", "model.latent_dim=5")
TINY_STACK = ("train.num_epochs=3", "model.latent_layers=[{latent_dim: 5, hidden_sizes: [20]}, {latent_dim: 3}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", required=True, help="folder with MNIST's IDX .gz files")
    parser.add_argument("--run", required=True, help="the run folder: a checkpoint there is resumed")
    parser.add_argument(
        "--stop-after-s",
        type=float,
        default=520.0,
        help="stop (with a checkpoint) once this many seconds have passed since the start",
    )
    parser.add_argument("--k", type=int, default=5000, help="importance samples for the test log p(x)")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal: 3 epochs of a small model")
    parser.add_argument("--config", default=BURDA, help="the run's config (default configs/mnist_burda.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value settings over the config")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda:0" if torch.cuda.is_available() and not args.tiny else "cpu")
    say(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}")
    data = os.path.join(tempfile.mkdtemp(prefix="aevb-burda-"), "mnist")
    prepare(args.mnist, data, num_shards=4, report=lambda m: None)  # deterministic: a resume sees the same rows
    run_uri = os.path.abspath(args.run)
    log_every, checkpoint_every = (200, 600) if args.tiny else (12000, 60000)
    extra = [
        f"run.name={os.path.basename(run_uri)}",
        f"train.log_every_steps={log_every}",
        "train.eval_every_steps=0",
        f"checkpoint.every_steps={checkpoint_every}",
        "checkpoint.keep_last=2",
        *(_tiny(args.config) if args.tiny else ("train.compile=true",)),
        *args.overrides,
    ]
    cfg = burda_config(data, os.path.dirname(run_uri), device, *extra, config=args.config)
    run = storage.run_folder(cfg.run)
    newest = checkpoint.latest(run.fs, run.path)
    manifest = checkpoint.read_manifest(run.fs, newest) if newest is not None else None
    plan = plan_run(cfg, ParquetDataset(f"{data}/train"), run.uri, newest, manifest)  # as `aevb-dist train` plans
    start_step, total = plan.start_step, plan.total_steps
    stop_after = args.stop_after_s if not args.tiny or newest is not None else 0.0  # tiny: stop once, then resume
    run.fs.makedirs(run.path, exist_ok=True)
    stop_request.clear(run)
    timer = threading.Timer(
        max(stop_after - (time.perf_counter() - started), 0.0),
        stop_request.request,
        (run, f"--stop-after-s={stop_after:g}"),
    )
    timer.daemon = True
    timer.start()
    say(f"training {total:,} steps ({cfg.train.num_epochs} epochs), from step {start_step:,}")
    sink = WriteToRunFolder(run, cfg.checkpoint.keep_last, cfg.run.storage_retry_s)
    train_started = time.perf_counter()
    with ProgressPrinter(run, total, start_step):
        stopped = run_worker(
            WorkerSpec(cfg, run, threads=torch.get_num_threads()),
            sink,
            WorkerContext(rank=0, world_size=1, device=str(device)),
        )
        sink.wait()
    timer.cancel()
    stop_request.clear(run)
    last = read_metrics(run.fs, run.file("metrics.csv"))[-1]
    say(
        f"trained {last['step'] - start_step:,} steps in {time.perf_counter() - train_started:.0f} s; now at "
        f"epoch {last['epoch']}, step {last['step']:,} of {total:,}"
    )
    if stopped is not None:
        say(f"stopped with a checkpoint in {run_uri}: run the same command again to go on")
        return
    say(f"finished: test ELBO {last['test_elbo']:.2f}")
    vae, _ = saved_model.model_from_bytes(checkpoint.load_checkpoint_bytes(run_uri)[0])
    peak = matmul_peak(device, 100_000 if device.type == "cuda" else 2000)
    final = SimpleNamespace(vae=vae.to(device), cfg=cfg)  # what test_log_px reads of a trainer
    test_log_px(final, data, device, 50 if args.tiny else args.k, peak, f"after {cfg.train.num_epochs} epochs")


def _tiny(config: str) -> tuple[str, ...]:
    """The rehearsal's small model: of one stochastic layer, or a stack where the config has one."""
    return TINY_STACK if load_config(config).model.latent_layers else TINY


if __name__ == "__main__":
    main()
