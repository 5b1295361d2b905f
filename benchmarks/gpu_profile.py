"""Where a GPU step's time goes: kernels per step and their device time, eager and captured.

    python benchmarks/gpu_profile.py --mnist DIR [--batch 100] [--compile]

The Burda et al. model (configs/mnist_burda.yaml) with `train.use_gpu=true data.cache_on_device=true`,
in this process. Prints, for benchmarks/gpu.py's independent plain loop captured as a CUDA graph (the
ceiling), aevb_dist's eager step and its captured CUDA-graph step: wall time per step,
kernels per step, their summed device time per step, and the ten kernels that take the most. A step
whose summed kernel time is close to its wall time is bound by the kernels themselves (many small ones),
not by the host. Run by hand on a GPU machine, not in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aevb_dist.data.prepare import prepare  # noqa: E402
from aevb_dist.train.batches import StepBatch  # noqa: E402
from aevb_dist.train.captured_step import CapturedStep  # noqa: E402
from aevb_dist.train.worker import trainer_for_config
from benchmarks.gpu import burda_config, plain_step  # noqa: E402

STEPS = 50


def profile_steps(run_step, label: str) -> None:
    for _ in range(20):
        run_step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        run_step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / STEPS
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            run_step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in kernels) / STEPS  # microseconds
    print(
        f"{label}: {wall * 1e6:.0f} us/step wall, {len(kernels) / STEPS:.0f} kernels/step, "
        f"{busy:.0f} us/step of kernel time",
        flush=True,
    )
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=10, max_name_column_width=60), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", required=True)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="aevb-prof-")
    data = os.path.join(work, "mnist")
    prepare(args.mnist, data, num_shards=4, report=lambda m: None)
    extra = [f"train.batch_size_per_worker={args.batch}", "data.test_uri=null", "train.max_steps=100000"]
    extra += ["train.compile=true"] if args.compile else []
    trainer = trainer_for_config(
        burda_config(data, os.path.join(work, "runs"), torch.device("cuda:0"), *extra), device="cuda:0"
    )
    stream, cached = trainer.source.stream(0, 0), trainer.source.device_data
    plan, words = cached.plan(stream), cached.epoch_words(0)
    batch_no = [0]

    def eager_step():
        positions = plan.positions[batch_no[0] % stream.num_batches]
        trainer.step_on(StepBatch(cached.batch(positions, words), positions))
        batch_no[0] += 1

    profile_steps(plain_step(cached.rows_ND, args.batch, captured=True), "plain loop, captured")
    profile_steps(eager_step, "eager step")
    captured = CapturedStep(trainer)
    captured.load_epoch(plan, words, 0)
    captured.capture()
    profile_steps(lambda: (captured.replay(0), captured.batch_no.zero_()), "captured step")


if __name__ == "__main__":
    main()
