"""Estimators of the marginal likelihood log p_θ(x), one value per example. Pure torch.

- `is`: importance sampling with q_φ(z|x) as proposal,
  log p(x) ≈ log (1/K) Σ_k p_θ(x, z_k) / q_φ(z_k|x), z_k ~ q_φ(z|x), with a running logsumexp
  over chunks of samples so K=5000 fits in memory. Consistent when q covers the posterior's
  support (every family on the real line does; positive or unit-interval families do not).
- `ais`: annealed importance sampling (Neal, 2001) from the prior p(z) to p_θ(z|x) along
  f_t(z) = p(z) p_θ(x|z)^β_t, with HMC transitions; independent of q.
- `appendix-d`: the paper's Appendix D: HMC samples from the posterior, a density q_D fitted to
  them (a full-covariance Gaussian per example), then on fresh posterior samples
  1/p(x) ≈ (1/L) Σ_l q_D(z_l) / (p_θ(z_l) p_θ(x|z_l)). For low-dimensional latents.

Shapes: B batch, D data dimension, Z latent dimension, C chains or samples in a chunk.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from aevb_dist import names
from aevb_dist.model.elbo import log_importance_weights
from aevb_dist.model.hmc import adapt_step_size, hmc_step
from aevb_dist.model.vae import VAE

ESTIMATORS = names.MARGINAL_LIKELIHOOD_ESTIMATORS  # the branches of estimate_log_marginal_likelihood
NARROWING = 0.8  # q_D's covariance, as a fraction of the fitted one (see appendix_d_log_marginal_likelihood)


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@torch.no_grad()
def log_marginal_likelihood(
    vae: VAE,
    x_BD: torch.Tensor,
    num_importance_samples: int = 5000,
    chunk_size: int = 100,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Importance-sampled log p_θ(x) with q_φ(z|x) as proposal, [B]."""
    _positive_int("num_importance_samples", num_importance_samples)
    _positive_int("chunk_size", chunk_size)
    dtype = next(vae.parameters()).dtype
    running_B = torch.full((x_BD.shape[0],), -math.inf, dtype=dtype, device=x_BD.device)
    remaining = num_importance_samples
    while remaining > 0:
        count = min(chunk_size, remaining)
        log_w_CB = log_importance_weights(vae, x_BD, count, generator)
        running_B = torch.logaddexp(running_B, torch.logsumexp(log_w_CB, dim=0))
        remaining -= count
    return running_B - math.log(num_importance_samples)


def _prior_draws(vae: VAE, x_BD: torch.Tensor, num_chains: int, generator) -> torch.Tensor:
    like = torch.empty((), dtype=next(vae.parameters()).dtype, device=x_BD.device)
    return vae.sample_prior((num_chains, x_BD.shape[0]), like, generator)


def annealing_schedule(num_steps: int, sharpness: float = 4.0, dtype=torch.float64) -> torch.Tensor:
    """β_0 = 0 < … < β_T = 1, sigmoidal (Grosse et al., 2015): dense near both ends, where f_t changes fastest."""
    s = torch.sigmoid(sharpness * torch.linspace(-1.0, 1.0, num_steps + 1, dtype=dtype))
    return (s - s[0]) / (s[-1] - s[0])


@torch.no_grad()
def ais_log_marginal_likelihood(
    vae: VAE,
    x_BD: torch.Tensor,
    num_chains: int = 16,
    num_steps: int = 500,
    num_leapfrog: int = 10,
    initial_step_size: float = 0.05,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """AIS estimate of log p_θ(x): log (1/C) Σ_c w_c, log w_c = Σ_t (β_t − β_{t−1}) log p_θ(x|z_{t−1}), [B]."""
    _positive_int("num_chains", num_chains)
    _positive_int("num_steps", num_steps)
    _positive_int("num_leapfrog", num_leapfrog)
    vae.check_input(x_BD)
    betas = annealing_schedule(num_steps).tolist()
    z_CBZ = _prior_draws(vae, x_BD, num_chains, generator)  # exact draws from f_0 = p(z)
    step_B = torch.full((x_BD.shape[0],), initial_step_size, dtype=z_CBZ.dtype, device=z_CBZ.device)
    log_w_CB = torch.zeros(z_CBZ.shape[:2], dtype=z_CBZ.dtype, device=z_CBZ.device)
    for t in range(1, num_steps + 1):
        log_w_CB += (betas[t] - betas[t - 1]) * vae.log_likelihood(x_BD, z_CBZ)

        def log_f(z, beta=betas[t]):
            return vae.log_prior(z) + beta * vae.log_likelihood(x_BD, z)

        z_CBZ, accept_CB = hmc_step(log_f, z_CBZ, step_B, num_leapfrog, generator)
        step_B = adapt_step_size(step_B, accept_CB)
    return torch.logsumexp(log_w_CB, dim=0) - math.log(num_chains)


def _posterior_samples(
    vae: VAE,
    x_BD: torch.Tensor,
    z_CBZ: torch.Tensor,
    step_B: torch.Tensor,
    num_draws: int,
    num_leapfrog: int,
    generator,
    adapt: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`num_draws` HMC transitions on p_θ(z|x); returns every state [num_draws·C, B, Z], the last state, step sizes."""

    def log_post(z):
        return vae.log_prior(z) + vae.log_likelihood(x_BD, z)

    kept = []
    for _ in range(num_draws):
        z_CBZ, accept_CB = hmc_step(log_post, z_CBZ, step_B, num_leapfrog, generator)
        if adapt:
            step_B = adapt_step_size(step_B, accept_CB)
        kept.append(z_CBZ)
    return torch.cat(kept, dim=0), z_CBZ, step_B


@torch.no_grad()
def appendix_d_log_marginal_likelihood(
    vae: VAE,
    x_BD: torch.Tensor,
    num_chains: int = 16,
    num_steps: int = 500,
    num_leapfrog: int = 10,
    initial_step_size: float = 0.05,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The paper's Appendix D estimator, [B]. `num_steps` HMC transitions per chain, split in three:
    burn-in (step sizes tuned), stage 1 (samples to fit q_D), stage 3 (fresh samples for the estimate)."""
    _positive_int("num_chains", num_chains)
    _positive_int("num_leapfrog", num_leapfrog)
    if not isinstance(num_steps, int) or num_steps < 3:
        raise ValueError(f"num_steps must be an integer >= 3 (burn-in, fit, estimate), got {num_steps!r}")
    vae.check_input(x_BD)
    # Chains start at q_φ(z|x)'s mean, near the posterior's mode, so burn-in is short.
    start_BZ, _ = vae.posterior_moments(x_BD)
    z_CBZ = start_BZ.expand(num_chains, *start_BZ.shape).clone()
    step_B = torch.full((x_BD.shape[0],), initial_step_size, dtype=z_CBZ.dtype, device=z_CBZ.device)
    third = num_steps // 3
    _, z_CBZ, step_B = _posterior_samples(
        vae, x_BD, z_CBZ, step_B, num_steps - 2 * third, num_leapfrog, generator, adapt=True
    )
    # (1)–(2): samples from the posterior, and a Gaussian q_D fitted to them per example.
    fit_NBZ, z_CBZ, _ = _posterior_samples(vae, x_BD, z_CBZ, step_B, third, num_leapfrog, generator, adapt=False)
    mean_BZ = fit_NBZ.mean(0)
    centered = (fit_NBZ - mean_BZ).permute(1, 0, 2)  # [B, N, Z]
    cov_BZZ = centered.transpose(1, 2) @ centered / max(fit_NBZ.shape[0] - 1, 1)
    # Narrowed so q_D's tails stay lighter than the posterior's: with heavier tails anywhere the
    # harmonic-mean estimate below has infinite variance. Any q_D keeps it unbiased for 1/p(x).
    cov_BZZ = NARROWING * cov_BZZ + 1e-6 * torch.eye(vae.latent_dim, dtype=cov_BZZ.dtype, device=cov_BZZ.device)
    q_d = torch.distributions.MultivariateNormal(mean_BZ, covariance_matrix=cov_BZZ)
    # (3): fresh posterior samples, and the estimate p(x)⁻¹ ≈ mean of q_D(z)/(p(z) p(x|z)).
    est_NBZ, _, _ = _posterior_samples(vae, x_BD, z_CBZ, step_B, third, num_leapfrog, generator, adapt=False)
    log_ratio_NB = q_d.log_prob(est_NBZ) - vae.log_prior(est_NBZ) - vae.log_likelihood(x_BD, est_NBZ)
    return -(torch.logsumexp(log_ratio_NB, dim=0) - math.log(est_NBZ.shape[0]))


def estimate_log_marginal_likelihood(
    vae: VAE,
    x_BD: torch.Tensor,
    estimator: str = "is",
    *,
    num_samples: int = 5000,
    chunk_size: int = 100,
    num_steps: int = 500,
    num_leapfrog: int = 10,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """log p_θ(x) by the named estimator, [B]. `num_samples` is K for `is`, the number of chains otherwise."""
    if estimator == "is":
        return log_marginal_likelihood(vae, x_BD, num_samples, chunk_size, generator)
    if estimator == "ais":
        return ais_log_marginal_likelihood(vae, x_BD, num_samples, num_steps, num_leapfrog, generator=generator)
    if estimator == "appendix-d":
        return appendix_d_log_marginal_likelihood(vae, x_BD, num_samples, num_steps, num_leapfrog, generator=generator)
    raise ValueError(f"--estimator {estimator!r} is not one of: {', '.join(ESTIMATORS)}")
