"""Hybrid (Hamiltonian) Monte Carlo over latent codes, batched over chains and examples.

Used by the paper's Appendix D estimator and by annealed importance sampling to draw from
p_θ(z|x) ∝ p_θ(z) p_θ(x|z), with ∇_z log p_θ(z|x) = ∇_z log p_θ(z) + ∇_z log p_θ(x|z). Each
example keeps its own step size, tuned towards a target acceptance rate. Pure torch.

Shapes: C chains, B examples, Z latent dimension.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

LogDensity = Callable[[torch.Tensor], torch.Tensor]  # z [C, B, Z] → log density up to a constant, [C, B]


def log_density_and_grad(log_density: LogDensity, z_CBZ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        z = z_CBZ.detach().requires_grad_(True)
        value_CB = log_density(z)
        (grad,) = torch.autograd.grad(value_CB.sum(), z)
    return value_CB.detach(), grad


def hmc_step(
    log_density: LogDensity,
    z_CBZ: torch.Tensor,
    step_size_B: torch.Tensor,
    num_leapfrog: int,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One HMC transition leaving `log_density` invariant: returns (new z, acceptance probability [C, B])."""
    # The step is jittered per chain: a fixed trajectory length can resonate with the posterior's
    # width and barely move along some directions. Jitter drawn independently of z keeps the target invariant.
    jitter = torch.rand(z_CBZ.shape[:2], generator=generator, dtype=z_CBZ.dtype, device=z_CBZ.device)
    eps = (step_size_B * (0.5 + jitter))[..., None]
    p0 = torch.randn(z_CBZ.shape, generator=generator, dtype=z_CBZ.dtype, device=z_CBZ.device)
    logp0, grad = log_density_and_grad(log_density, z_CBZ)
    z, p = z_CBZ, p0 + 0.5 * eps * grad
    for i in range(num_leapfrog):
        z = z + eps * p
        logp, grad = log_density_and_grad(log_density, z)
        p = p + (eps if i < num_leapfrog - 1 else 0.5 * eps) * grad
    # Metropolis correction with H = −log f(z) + ½|p|²; a non-finite proposal is rejected.
    log_accept = (logp - logp0) - 0.5 * (p.pow(2).sum(-1) - p0.pow(2).sum(-1))
    log_accept = torch.where(torch.isfinite(log_accept), log_accept, torch.full_like(log_accept, -torch.inf))
    accept_prob = log_accept.clamp(max=0.0).exp()
    u = torch.rand(accept_prob.shape, generator=generator, dtype=z.dtype, device=z.device)
    take = (u < accept_prob)[..., None]
    return torch.where(take, z, z_CBZ), accept_prob


def adapt_step_size(step_size_B: torch.Tensor, accept_prob_CB: torch.Tensor, target: float = 0.65) -> torch.Tensor:
    """Grow the step where chains accept more than the target, shrink it where they accept less."""
    rate_B = accept_prob_CB.mean(0)
    return torch.where(rate_B > target, step_size_B * 1.02, step_size_B * 0.98).clamp(1e-4, 2.0)
