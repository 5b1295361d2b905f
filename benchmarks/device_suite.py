"""The design card's shape on a GPU machine, measured in one device call (≤ 8 minutes, `--deadline-s`).

    python benchmarks/device_suite.py --mnist DIR [--out DIR] [--deadline-s 470] [--sections ...] [--tiny]

DIR holds MNIST's IDX .gz files. Printed as it goes (each section skipped, saying so, when the deadline
leaves it no room; a failing part prints why and the others still run):
- `versions`: torch, CUDA, Ray, the GPU, the cores;
- `gpu-tests`: tests/test_gpu.py, test_device_stream.py and test_device_path.py, run on the GPU (pytest's summary);
- `gpu`: steady-state steps/s of Burda et al.'s model (784-200-200-50, Adam, dynamic binarization) at M=100 and
  M=1000: the plain captured loop (benchmarks/gpu.py, written without aevb_dist), the `Trainer` in this
  process, and `aevb-dist train` on the embedded Ray and with `ray.local_mode=true`, each with the device cache
  (`data.cache_on_device=true`) and streamed (`data.cache_on_device=false data.decoded_cache_mib=0`: every epoch
  reads Parquet); ratios: streamed / cached, and `aevb-dist train` / the `Trainer`;
- `cpu`: CPU scaling on the machine's cores: `aevb-dist train` on the embedded Ray (gloo) with 1, 2, 4 and 8
  workers of one thread at a fixed global batch (M=1000 and M=100; the paper's 784-500-20 model, Adagrad)
  against plain torch DDP (benchmarks/plain.py) with the same processes and threads, measured in the same
  call: samples/s and aevb / plain.

`--tiny` rehearses every section on this machine's CPU with tiny sizes (the GPU sections then measure CPU
paths; their figures mean nothing). Keep the log as benchmarks/results/<device>_device_suite.log. Run by hand.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from gpu import attempt, plain_steps_per_s, say  # noqa: E402  (benchmarks/gpu.py)
from plain import PlainVAE  # noqa: E402  (benchmarks/plain.py: written without aevb_dist)
from throughput import make_step, read_metrics_rows, steady_samples_per_s, timed_loop  # noqa: E402

from aevb_dist.config import load_config  # noqa: E402
from aevb_dist.data.prepare import prepare  # noqa: E402
from aevb_dist.data.sources import read_idx  # noqa: E402
from aevb_dist.train.worker import trainer_for_config  # noqa: E402

BURDA = os.path.join(REPO, "configs", "mnist_burda.yaml")
SMOKE = os.path.join(REPO, "configs", "smoke.yaml")
STARTED = time.perf_counter()
CACHED = ("data.cache_on_device=true",)
STREAMED = ("data.cache_on_device=false", "data.decoded_cache_mib=0")


class Deadline:
    def __init__(self, seconds: float):
        self.end = STARTED + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, section: str, needs_s: float) -> bool:
        if self.left() >= needs_s:
            return True
        say(f"{section}: skipped, {self.left():.0f} s left of the deadline and it needs ~{needs_s:.0f} s")
        return False


def versions() -> None:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    say(
        f"versions: torch {torch.__version__}, CUDA {torch.version.cuda}, Ray {version('ray')}, pyarrow "
        f"{version('pyarrow')}; GPU: {gpu}; cores: {os.cpu_count()}"
    )


def gpu_tests(timeout_s: float) -> None:
    files = ["tests/test_gpu.py", "tests/test_device_stream.py", "tests/test_device_path.py"]
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    for line in lines:
        if line.startswith(("FAILED", "ERROR", "SKIPPED")):
            say(f"gpu-tests: {line[:300]}")
    say(f"gpu-tests: {lines[-1] if lines else proc.stderr[-500:]} (exit {proc.returncode})")


# -- the GPU ---------------------------------------------------------------------------------------
def trainer_steps_per_s(data: str, runs: str, device: torch.device, batch: int, steps: int, *extra: str) -> float:
    """The `Trainer` in this process: the median steps/s over the log windows after the first (the capture)."""
    overrides = [
        f"data.train_uri={data}/train",
        "data.test_uri=null",
        f"run.storage_uri={runs}",
        f"train.use_gpu={str(device.type == 'cuda').lower()}",
        f"train.batch_size_per_worker={batch}",
        f"train.max_steps={steps}",
        f"train.log_every_steps={max(steps // 6, 1)}",
        f"checkpoint.every_steps={steps}",
    ]
    trainer = trainer_for_config(load_config(BURDA, overrides + list(extra)), device=str(device))
    rows: list[dict] = []
    trainer.fit(on_log=rows.append, on_checkpoint=lambda state, row: None)
    return float(np.median([r["samples_per_s"] / batch for r in rows if r["step"] > max(steps // 6, 1)]))


def command_steps_per_s(config: str, runs: str, name: str, batch: int, steps: int, *overrides: str) -> float:
    """`aevb-dist train`, its steady state: steps/s between its second and its last log line (metrics.csv)."""
    args = [
        f"run.storage_uri={runs}",
        f"run.name={name}",
        f"train.max_steps={steps}",
        f"train.log_every_steps={max(steps // 10, 1)}",
        "train.eval_every_steps=0",
        "data.test_uri=null",
        f"checkpoint.every_steps={steps}",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "aevb_dist", "train", config, *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    rows = read_metrics_rows(os.path.join(runs, name))
    return steady_samples_per_s(rows) / (batch * int(rows[-1]["num_workers"]))


def gpu_section(images: torch.Tensor, data: str, runs: str, device: torch.device, tiny: bool) -> None:
    on_gpu = device.type == "cuda"
    for batch in (100, 1000):
        steps = (3000 if batch == 100 else 1200) if on_gpu else 24
        common = (f"data.train_uri={data}/train", f"train.batch_size_per_worker={batch}")
        common += ("train.use_gpu=true",) if on_gpu else ("train.cpus_per_worker=1",)
        plain = attempt("plain captured loop", lambda: plain_steps_per_s(images, batch, steps, captured=on_gpu))
        rates: dict[str, float] = {}
        for data_name, how in (("cached", CACHED), ("streamed", STREAMED)):
            rates[f"trainer {data_name}"] = attempt(
                f"Trainer {data_name}", lambda: trainer_steps_per_s(data, runs, device, batch, steps, *how)
            )
            for launcher, mode in (("embedded Ray", "false"), ("local mode", "true")):
                name = f"gpu-{batch}-{data_name}-{mode}"
                rates[f"{launcher} {data_name}"] = attempt(
                    f"aevb-dist train, {launcher}, {data_name}",
                    lambda: command_steps_per_s(
                        BURDA, runs, name, batch, steps, *common, *how, f"ray.local_mode={mode}"
                    ),
                )
        say(f"gpu M={batch}: plain captured loop {plain:,.0f} steps/s")
        for what, rate in rates.items():
            say(f"gpu M={batch}: {what:24s} {rate:10,.0f} steps/s  ({rate / plain:.2f}× the plain loop)")
        for where in ("trainer", "embedded Ray", "local mode"):
            ratio = rates[f"{where} streamed"] / rates[f"{where} cached"]
            say(f"gpu M={batch}: {where}: streamed / cached = {ratio:.2f} (target ≥ 0.9)")
        for launcher in ("embedded Ray", "local mode"):
            for data_name in ("cached", "streamed"):
                ratio = rates[f"{launcher} {data_name}"] / rates[f"trainer {data_name}"]
                say(f"gpu M={batch}: {launcher} / Trainer, {data_name} = {ratio:.2f} (target ≥ 0.9)")


# -- CPU scaling -----------------------------------------------------------------------------------
def _plain_rank(rank: int, world: int, port: int, batch: int, steps: int, mnist: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    images = read_idx(os.path.join(mnist, "train-images-idx3-ubyte.gz")).reshape(-1, 784)
    data = torch.from_numpy(images.astype(np.float32) / 255.0)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(PlainVAE())
    rate = timed_loop(make_step(model, data, batch // world, rank, world), num_steps=steps) * batch
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(rate))
    dist.barrier()  # rank 0 hosts the store: leave together
    dist.destroy_process_group()


def plain_ddp_samples_per_s(world: int, batch: int, steps: int, mnist: str) -> float:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = os.path.join(tmp, "rate")
        mp.spawn(_plain_rank, args=(world, port, batch, steps, mnist, out), nprocs=world, join=True)
        return float(open(out).read())


def cpu_section(data: str, runs: str, mnist: str, tiny: bool, deadline: Deadline) -> None:
    paper = (
        f"data.train_uri={data}/train",
        "model.input_dim=784",
        "model.hidden_sizes=[500]",
        "model.latent_dim=20",
        "model.activation=tanh",
        "model.likelihood=bernoulli",
        "data.binarization=dynamic",
        "optim.name=adagrad",
        "optim.lr=0.02",
        "train.cpus_per_worker=1",
    )
    counts = (1, 2) if tiny else tuple(w for w in (1, 2, 4, 8) if w < (os.cpu_count() or 1))
    for batch in (1000, 100):
        steps = 20 if tiny else (300 if batch == 1000 else 1500)
        samples = []
        for workers in counts:
            if not deadline.allows(f"cpu M={batch} {workers} worker(s)", 40):
                return
            plain = attempt("plain DDP", lambda: plain_ddp_samples_per_s(workers, batch, steps, mnist))
            ours = attempt(
                "aevb-dist train",
                lambda: (
                    batch
                    * command_steps_per_s(
                        SMOKE,
                        runs,
                        f"cpu-{batch}-{workers}",
                        batch // workers,
                        steps,
                        *paper,
                        f"train.num_workers={workers}",
                        f"train.batch_size_per_worker={batch // workers}",
                    )
                ),
            )
            samples.append(ours)
            say(
                f"cpu M={batch}: {workers} worker(s) × 1 thread: aevb-dist {ours:,.0f} samples/s, plain DDP "
                f"{plain:,.0f}: {ours / plain:.2f}× (target ≥ 0.9)"
            )
        rising = all(b > a for a, b in zip(samples, samples[1:]))
        say(f"cpu M={batch}: samples/s rising with workers: {rising} ({', '.join(f'{s:,.0f}' for s in samples)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", required=True, help="folder with MNIST's IDX .gz files")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="aevb-device-"))
    parser.add_argument("--deadline-s", type=float, default=470.0, help="the whole script's time")
    parser.add_argument("--sections", default="versions,gpu-tests,gpu,cpu", help="comma-separated, in this order")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal with tiny sizes")
    args = parser.parse_args()
    sections, deadline = args.sections.split(","), Deadline(args.deadline_s)
    device = torch.device("cuda:0" if torch.cuda.is_available() and not args.tiny else "cpu")
    data, runs = os.path.join(args.out, "mnist"), os.path.join(args.out, "runs")
    if not os.path.exists(data):
        prepare(args.mnist, data, num_shards=8 if not args.tiny else 2, report=lambda m: None)
    if "versions" in sections:
        versions()
    if "gpu-tests" in sections and deadline.allows("gpu-tests", 60):
        attempt("gpu-tests", lambda: gpu_tests(min(240.0, deadline.left() - 30)))
    if "gpu" in sections and deadline.allows("gpu", 120):
        images = read_idx(os.path.join(args.mnist, "train-images-idx3-ubyte.gz")).reshape(-1, 784)
        gpu_section(torch.from_numpy(images.copy()).to(device), data, runs, device, args.tiny)
    if "cpu" in sections and deadline.allows("cpu", 60):
        cpu_section(data, runs, args.mnist, args.tiny, deadline)
    say(f"done in {time.perf_counter() - STARTED:.0f} s")


if __name__ == "__main__":
    main()
