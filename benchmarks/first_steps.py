"""Why the learning curve of `configs/mnist.yaml` dips before it rises: the first steps, looked into.

    python benchmarks/first_steps.py [--steps 400] [--seed 0]

Trains the paper's MNIST model as `configs/mnist.yaml` builds it (784-500-20 tanh, N(0, 0.01²) weights,
Bernoulli decoder, estimator B, L=1, M=100 on real MNIST, dynamically binarized) in this process, with
aevb_dist's model and optimizer factory, under three optimizers: the config's Adagrad (lr 0.02), Adagrad at
a tenth of that, and Adam (lr 0.001). At chosen steps it prints the minibatch ELBO, its two terms
(E_q log p(x|z) and KL(q||p)), the mean |tanh| of the encoder's and the decoder's hidden units, and the
largest |encoder mean|: where the hidden units saturate, the code and the reconstruction jump. (The MAP
prior of the config, (M/N)θ, is left out: at this scale it moves nothing in the first steps.) Run by hand.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from aevb_dist.config import load_config
from aevb_dist.data.sources import read_idx_folder
from aevb_dist.model.elbo import sgvb_b_terms
from aevb_dist.model.vae import VAE
from aevb_dist.train.optimizers import build_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.environ.get("AEVB_SHARED_DATA", os.path.join(REPO, "..", "shared", "data")) + "/mnist"
SHOWN = (1, 2, 3, 5, 10, 20, 50, 100, 200, 400, 800, 1600)


def hidden_activity(vae: VAE, x_BD: torch.Tensor, z_BZ: torch.Tensor) -> tuple[float, float]:
    """Mean |tanh| of the encoder's and the decoder's hidden layer (1: saturated, 0: linear and silent)."""
    encoder_hidden = vae.encoder[:-1](x_BD)
    decoder_hidden = vae.decoder[:-1](z_BZ)
    return encoder_hidden.abs().mean().item(), decoder_hidden.abs().mean().item()


def run(optimizer: str, lr: float, images: torch.Tensor, steps: int, seed: int) -> None:
    cfg = load_config(os.path.join(REPO, "configs", "mnist.yaml"), [f"seed={seed}"])
    vae = VAE.from_config(cfg.model, seed=seed)
    opt = build_optimizer(vae.parameters(), optimizer, lr)
    data = torch.Generator().manual_seed(seed)
    print(f"\n{optimizer} lr={lr:g}")
    print("  step   ELBO     E log p(x|z)   KL     |h_enc|  |h_dec|  max|mu|")
    for step in range(1, steps + 1):
        rows = torch.randint(0, images.shape[0], (100,), generator=data)
        x = torch.bernoulli(images[rows], generator=data)
        reconstruction, kl = sgvb_b_terms(vae, x, 1, generator=data)
        elbo = reconstruction - kl.sum(-1)
        opt.zero_grad()
        (-elbo.mean()).backward()
        if step in SHOWN:  # before the update: the ELBO this step's minibatch got
            with torch.no_grad():
                mean, _ = vae.encode(x)
                h_enc, h_dec = hidden_activity(vae, x, mean)
            print(
                f"  {step:4d}  {elbo.mean().item():8.1f}  {reconstruction.mean().item():10.1f}  "
                f"{kl.sum(-1).mean().item():7.1f}  {h_enc:7.3f}  {h_dec:7.3f}  {mean.abs().max().item():7.2f}"
            )
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    images = torch.from_numpy(read_idx_folder(MNIST, "train").images.reshape(-1, 784).astype(np.float32) / 255.0)
    for optimizer, lr in (("adagrad", 0.02), ("adagrad", 0.002), ("adam", 0.001)):
        run(optimizer, lr, images, args.steps, args.seed)


if __name__ == "__main__":
    main()
