"""The peer a user would pick instead: pythae's VAE trainer against `aevb-dist train`, command to exit.

pythae is not a project dependency; install it beside the project's torch (its own environment, this
machine's torch and numpy reused):

    python -m venv --system-site-packages /tmp/pythae-venv
    /tmp/pythae-venv/bin/pip install pythae==0.1.2
    python benchmarks/peer_pythae.py --pythae-python /tmp/pythae-venv/bin/python [--epochs 5] [--repeats 3]

The same model and optimizer on both sides: the paper's 784-500-20 MLP (tanh), Bernoulli decoder,
SGVB-B (pythae's VAE: closed-form KL, one sample), Adagrad lr 0.02, minibatch 100, 1 process with all
cores' threads, real MNIST's 60,000 training images. What each side does beyond the loop, as a user
runs it: pythae reads the IDX file into memory (intensities, no binarization: pythae has none) and
saves its final model; `aevb-dist train configs/mnist.yaml` streams Parquet prepared beforehand (not
timed: `aevb-dist prepare` once per dataset) with dynamic binarization, in local mode
(`ray.local_mode=true`, 1 worker), MAP prior, logging, checkpoints and the test-set ELBO at the end.
Runs alternate (this machine's speed drifts); prints each side's median seconds and the ratio.
Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(os.path.dirname(REPO), "shared", "data", "mnist")

# Run with pythae's interpreter; imports nothing from aevb_dist.
PYTHAE_SCRIPT = r"""
import gzip, sys
import numpy as np
import torch
from torch import nn
from pythae.models import VAE, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseEncoder
from pythae.pipelines import TrainingPipeline
from pythae.trainers import BaseTrainerConfig

mnist, out_dir, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(torch.get_num_threads())
with gzip.open(f"{mnist}/train-images-idx3-ubyte.gz") as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0


class Encoder(BaseEncoder):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(784, 500), nn.Tanh())
        self.mu, self.log_var = nn.Linear(500, 20), nn.Linear(500, 20)

    def forward(self, x):
        h = self.hidden(x.reshape(x.shape[0], -1))
        return ModelOutput(embedding=self.mu(h), log_covariance=self.log_var(h))


class Decoder(BaseDecoder):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 500), nn.Tanh(), nn.Linear(500, 784), nn.Sigmoid())

    def forward(self, z):
        return ModelOutput(reconstruction=self.net(z).reshape(z.shape[0], 1, 28, 28))


model = VAE(VAEConfig(input_dim=(1, 28, 28), latent_dim=20, reconstruction_loss="bce"),
            encoder=Encoder(), decoder=Decoder())
config = BaseTrainerConfig(output_dir=out_dir, num_epochs=epochs, per_device_train_batch_size=100,
                           learning_rate=0.02, optimizer_cls="Adagrad", no_cuda=True, steps_saving=None,
                           train_dataloader_num_workers=0)
TrainingPipeline(training_config=config, model=model)(train_data=images)
"""


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pythae-python", required=True, help="the interpreter of an environment with pythae")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mnist", default=MNIST)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "pythae_vae.py")
        with open(script, "w") as f:
            f.write(PYTHAE_SCRIPT)
        subprocess.run(
            [sys.executable, "-m", "aevb_dist", "prepare", args.mnist, f"{tmp}/mnist"],
            check=True,
            capture_output=True,
            env=env,
        )

        def pythae(name: str, epochs: int) -> float:
            return timed([args.pythae_python, script, args.mnist, f"{tmp}/{name}", str(epochs)], env)

        def aevb(name: str, epochs: int) -> float:
            return timed(
                [
                    sys.executable,
                    "-m",
                    "aevb_dist",
                    "train",
                    os.path.join(REPO, "configs", "mnist.yaml"),
                    f"data.train_uri={tmp}/mnist/train",
                    f"data.test_uri={tmp}/mnist/test",
                    "train.num_workers=1",
                    "train.batch_size_per_worker=100",
                    f"train.num_epochs={epochs}",
                    "ray.local_mode=true",
                    f"run.storage_uri={tmp}/runs",
                    f"run.name={name}",
                ],
                env,
            )

        pythae("warmup", 1), aevb("warmup", 1)  # untimed: the first start compiles each side's bytecode
        times: dict[str, list[float]] = {"pythae": [], "aevb_dist": []}
        for r in range(args.repeats):
            times["pythae"].append(pythae(f"pythae_{r}", args.epochs))
            times["aevb_dist"].append(aevb(f"peer_{r}", args.epochs))
            print(
                f"repeat {r + 1}: pythae {times['pythae'][-1]:.1f} s, aevb-dist {times['aevb_dist'][-1]:.1f} s",
                flush=True,
            )
    p, a = statistics.median(times["pythae"]), statistics.median(times["aevb_dist"])
    print(
        f"epochs={args.epochs} pythae_s={p:.1f} aevb_dist_local_mode_s={a:.1f} aevb_dist_over_pythae={a / p:.2f} "
        f"(command to exit, medians of {args.repeats})"
    )


if __name__ == "__main__":
    main()
