"""Importance-sampled estimate of the marginal likelihood log p_θ(x), with q_φ(z|x) as proposal.

log p(x) ≈ log (1/K) Σ_k p_θ(x, z_k) / q_φ(z_k|x), z_k ~ q_φ(z|x), computed in log space
with a running logsumexp over chunks of samples, so K=5000 fits in memory. Pure torch.

Shapes: B batch, D data dimension, Z latent dimension, C samples in a chunk.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from aevb_dist.elbo import log_importance_weights
from aevb_dist.vae import VAE


@torch.no_grad()
def log_marginal_likelihood(vae: VAE, x_BD: torch.Tensor, num_importance_samples: int = 5000,
                            chunk_size: int = 500, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-example estimate of log p_θ(x), shape [B]."""
    if not isinstance(num_importance_samples, int) or num_importance_samples < 1:
        raise ValueError(f"num_importance_samples must be a positive integer, got {num_importance_samples!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    mean_BZ, logvar_BZ = vae.encode(x_BD)
    running_B = torch.full((x_BD.shape[0],), -math.inf, dtype=mean_BZ.dtype, device=mean_BZ.device)
    remaining = num_importance_samples
    while remaining > 0:
        count = min(chunk_size, remaining)
        log_w_CB = log_importance_weights(vae, x_BD, mean_BZ, logvar_BZ, count, generator)
        running_B = torch.logaddexp(running_B, torch.logsumexp(log_w_CB, dim=0))
        remaining -= count
    return running_B - math.log(num_importance_samples)
