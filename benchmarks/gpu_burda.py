"""Burda et al.'s VAE trained as they trained it, on one GPU, resumable across device calls.

    python benchmarks/gpu_burda.py --mnist DIR --run DIR [--stop-after-s 520] [--k 5000] [--tiny]

configs/mnist_burda.yaml: 784-200-200-50 tanh, Bernoulli, dynamic binarization, M=100, Adam with
ε = 1e-4 and Burda et al.'s learning-rate stages (`optim.lr_schedule=burda2015`: 3^i epochs at
0.001·10^(−i/7), i = 0…7), 3,280 epochs = 1.97 M steps; trained by aevb_dist's Trainer with the
captured, compiled GPU step (`train.use_gpu=true data.cache_on_device=true train.compile=true`).

A device call is at most 600 s, and the whole schedule takes ~540 s of steps on an H100. So the run
stops itself after --stop-after-s, with a checkpoint in the run folder --run (the product's checkpoint
format, written by the workers' own `save_checkpoint`, with metrics.csv beside it), and the same command with
the same --run resumes it from there. When all 3,280 epochs are done it prints the test ELBO and the
test log p(x) with K importance samples on the 10,000 test images (benchmarks/gpu.py: test_log_px).
`--tiny` rehearses it on this machine's CPU: 3 epochs of a small model, stopping once on the way.
Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpu import burda_config, matmul_peak, say, test_log_px  # noqa: E402

from aevb_dist import checkpoint, storage  # noqa: E402
from aevb_dist.data.prepare import prepare  # noqa: E402
from aevb_dist.run_log import RunLog  # noqa: E402
from aevb_dist.train.run_folder_sink import WriteToRunFolder  # noqa: E402
from aevb_dist.train.step_setup import learning_rate  # noqa: E402
from aevb_dist.train.trainer import Trainer  # noqa: E402
from aevb_dist.train.worker import save_checkpoint  # noqa: E402  (what every worker's rank 0 runs at a checkpoint)

TINY = ("train.num_epochs=3", "model.hidden_sizes=[20,20]", "model.latent_dim=5")


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
        *(TINY if args.tiny else ("train.compile=true",)),
    ]
    cfg = burda_config(data, os.path.dirname(run_uri), device, *extra)
    run = storage.run_folder(cfg.run)
    trainer = Trainer(cfg, device=str(device))
    newest = checkpoint.latest(run.fs, run.path)
    if newest is not None:
        trainer.load_state_dict(checkpoint.load(run.fs, newest, map_location=str(device)))
        say(f"resumed from {os.path.basename(newest)}: epoch {trainer.state.epoch}, step {trainer.state.step:,}")
    stop_after = args.stop_after_s if not args.tiny or newest is not None else 0.0  # tiny: stop once, then resume
    trainer.stop_probe = lambda: time.perf_counter() - started > stop_after
    sink = WriteToRunFolder(run, cfg.checkpoint.keep_last, cfg.run.storage_retry_s)
    log = RunLog(run, resume_step=trainer.state.step, total_steps=trainer.total_steps, retry_s=cfg.run.storage_retry_s)
    say(f"training {trainer.total_steps:,} steps ({cfg.train.num_epochs} epochs), from step {trainer.state.step:,}")

    def on_log(row: dict) -> None:
        log.append(row)
        lr = learning_rate(cfg.optim.lr, cfg.optim.lr_schedule, row["epoch"])
        say(
            f"  step {row['step']:,} epoch {row['epoch']} lr {lr:.3g} train ELBO {row['train_elbo']:.2f} "
            f"({row['samples_per_s']:,.0f} samples/s)"
        )

    start_step, start = trainer.state.step, time.perf_counter()
    last = trainer.fit(on_log=on_log, on_checkpoint=lambda state, row: save_checkpoint(cfg, 0, state, row, log, sink))
    sink.wait()
    log.close()
    steps = trainer.state.step - start_step
    say(
        f"trained {steps:,} steps in {time.perf_counter() - start:.0f} s; now at epoch {trainer.state.epoch}, "
        f"step {trainer.state.step:,} of {trainer.total_steps:,}"
    )
    if trainer.state.step < trainer.total_steps:
        say(f"stopped with a checkpoint in {run_uri}: run the same command again to go on")
        return
    say(f"finished: test ELBO {last['test_elbo']:.2f}")
    peak = matmul_peak(device, 100_000 if device.type == "cuda" else 2000)
    test_log_px(trainer, data, device, 50 if args.tiny else args.k, peak, f"after {cfg.train.num_epochs} epochs")


if __name__ == "__main__":
    main()
