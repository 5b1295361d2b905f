"""A linear-Gaussian VAE whose log p(x), exact posterior and ELBO have closed forms.

p(z) = N(0, I), p(x|z) = N(Wz + b, σ² I)  ⇒  p(x) = N(b, W Wᵀ + σ² I).
With orthogonal columns of W the exact posterior is diagonal, so the encoder can represent it.
"""

from __future__ import annotations

import math

import torch

from aevb_dist.model.vae import VAE

D, Z = 6, 3


def make_model(sigma: float = 0.5, exact_posterior: bool = True, seed: int = 0) -> tuple[VAE, dict]:
    torch.manual_seed(seed)
    vae = VAE(input_dim=D, hidden_sizes=[], latent_dim=Z, likelihood="gaussian").double()
    q, _ = torch.linalg.qr(torch.randn(D, Z, dtype=torch.float64))
    W = q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)  # orthogonal columns
    b = torch.randn(D, dtype=torch.float64)
    post_var = 1.0 / (1.0 + (W * W).sum(0) / sigma**2)  # diag of (I + WᵀW/σ²)⁻¹
    A = post_var[:, None] * W.T / sigma**2  # posterior mean = A (x − b)
    with torch.no_grad():
        dec, enc = vae.decoder[0], vae.encoder[0]
        dec.weight.zero_()
        dec.bias.zero_()
        dec.weight[:D] = W
        dec.bias[:D] = b
        dec.bias[D:] = math.log(sigma**2)
        enc.weight.zero_()
        enc.bias.zero_()
        enc.weight[:Z] = A
        enc.bias[:Z] = -A @ b
        enc.bias[Z:] = post_var.log()
        if not exact_posterior:  # a deliberately imperfect q_φ(z|x)
            enc.weight[:Z] *= 0.8
            enc.bias[Z:] += 0.5
    return vae, {"W": W, "b": b, "sigma": sigma}


def exact_log_marginal(params: dict, x: torch.Tensor) -> torch.Tensor:
    W, b, sigma = params["W"], params["b"], params["sigma"]
    cov = W @ W.T + sigma**2 * torch.eye(D, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def analytic_elbo(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """E_q[log p(x|z)] − KL in closed form for the linear-Gaussian decoder, differentiable in all parameters."""
    mean, logvar = vae.encode(x)
    dec = vae.decoder[0]
    W, b = dec.weight[:D], dec.bias[:D]
    log_s2 = dec.bias[D:]  # decoder log-variance (weights set to zero)
    pred = mean @ W.T + b
    trace = (W.pow(2) @ logvar.exp().T).T  # diag(W diag(s²) Wᵀ) per example, [B, D]
    expected_ll = -0.5 * (math.log(2 * math.pi) + log_s2 + ((x - pred).pow(2) + trace) / log_s2.exp()).sum(-1)
    kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(-1)
    return expected_ll - kl


def sample_data(params: dict, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W, b, sigma = params["W"], params["b"], params["sigma"]
    z = torch.randn(n, Z, generator=g, dtype=torch.float64)
    return z @ W.T + b + sigma * torch.randn(n, D, generator=g, dtype=torch.float64)
