"""The ceilings' model, written without aevb_dist's code: what a user writes by hand.

`PlainVAE(hidden_sizes, latent)`: tanh MLPs of `nn.Linear` layers (784-500-40 and 20-500-784 for the
paper's MNIST model; the encoder's last layer gives μ and log σ² together), BCE with logits and the
closed-form Gaussian KL (the paper's Appendix B), mean over the batch. Its forward is the loss, so DDP
sees the whole computation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _tanh_mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    return nn.Sequential(*layers)


class PlainVAE(nn.Module):
    def __init__(self, hidden_sizes: tuple[int, ...] = (500,), latent: int = 20, dim: int = 784):
        super().__init__()
        self.enc = nn.Sequential(_tanh_mlp([dim, *hidden_sizes]), nn.Linear(hidden_sizes[-1], 2 * latent))
        self.dec = nn.Sequential(_tanh_mlp([latent, *reversed(hidden_sizes)]), nn.Linear(hidden_sizes[0], dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        rec = F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (rec + kl) / x.shape[0]


@torch.no_grad()
def plain_log_px(model: PlainVAE, x: torch.Tensor, k: int, chunk: int, generator: torch.Generator) -> torch.Tensor:
    """The importance-sampled log p(x) as a user writes it by hand: log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x),
    z_k ~ q(z|x), `chunk` samples per pass, BCE with logits. [B]."""
    mu, logvar = model.enc(x).chunk(2, dim=-1)
    std = torch.exp(0.5 * logvar)
    log_w = []
    for start in range(0, k, chunk):
        eps = torch.randn(min(chunk, k - start), *mu.shape, generator=generator)
        z = mu + std * eps
        logits = model.dec(z)
        log_px_z = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + logvar).sum(-1)
        log_w.append(log_px_z + log_pz - log_qz)
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)
