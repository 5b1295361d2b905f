"""Variance of the ELBO gradient under each estimator, on one model and one minibatch.

The paper (Section 2.3) expects estimator B, with the KL in closed form, to have lower
variance than the generic estimator A. For each estimator we draw the minibatch gradient
`num_draws` times with fresh noise ε and report the summed per-parameter variance
(the trace of the gradient covariance), overall and for encoder (φ) and decoder (θ). Pure torch.
"""

from __future__ import annotations

import torch

from aevb_dist import seeds
from aevb_dist.model.elbo import per_example_bound
from aevb_dist.model.vae import VAE


def gradient_draws(
    vae: VAE, x: torch.Tensor, estimator: str, num_latent_samples: int, num_draws: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Gradients of the minibatch-mean bound, [num_draws, P] for encoder and decoder."""
    groups = vae.parameter_groups()
    draws: dict[str, list[torch.Tensor]] = {k: [] for k in groups}
    for d in range(num_draws):
        gen = torch.Generator().manual_seed(seeds.gradient_draw_seed(seed, d))
        elbo = per_example_bound(vae, x, estimator, num_latent_samples, generator=gen).mean()
        grads = torch.autograd.grad(elbo, groups["encoder"] + groups["decoder"])
        n_enc = len(groups["encoder"])
        draws["encoder"].append(torch.cat([g.reshape(-1) for g in grads[:n_enc]]))
        draws["decoder"].append(torch.cat([g.reshape(-1) for g in grads[n_enc:]]))
    return {k: torch.stack(v) for k, v in draws.items()}


def variance_report(
    vae: VAE,
    x: torch.Tensor,
    *,
    estimators=("A", "B"),
    num_latent_samples: int = 1,
    num_draws: int = 100,
    seed: int = 0,
) -> dict:
    if num_draws < 2:
        raise ValueError(f"--num-draws={num_draws} must be at least 2 to estimate a variance")
    report: dict = {"batch_size": x.shape[0], "num_draws": num_draws, "num_latent_samples": num_latent_samples}
    for est in estimators:
        draws = gradient_draws(vae, x, est, num_latent_samples, num_draws, seed)
        both = torch.cat([draws["encoder"], draws["decoder"]], dim=1)
        report[est] = {
            "total_variance": both.var(0).sum().item(),
            "encoder_variance": draws["encoder"].var(0).sum().item(),
            "decoder_variance": draws["decoder"].var(0).sum().item(),
            "squared_norm_of_mean": both.mean(0).pow(2).sum().item(),
        }
    if "A" in report and "B" in report:
        report["variance_ratio_A_over_B"] = report["A"]["total_variance"] / report["B"]["total_variance"]
    return report


def variance_sweep(
    vae: VAE,
    x: torch.Tensor,
    *,
    estimators=("A", "B", "iwae"),
    latent_samples=(1,),
    num_draws: int = 100,
    seed: int = 0,
) -> dict:
    """`variance_report` for each L (K for iwae) in `latent_samples`: how the variance falls with more samples."""
    if not latent_samples or any(int(n) < 1 for n in latent_samples):
        raise ValueError(f"--num-latent-samples={list(latent_samples)} must be positive integers")
    reports = [
        variance_report(vae, x, estimators=estimators, num_latent_samples=int(n), num_draws=num_draws, seed=seed)
        for n in latent_samples
    ]
    return {
        "batch_size": x.shape[0],
        "num_draws": num_draws,
        "estimators": list(estimators),
        "results": [{k: v for k, v in r.items() if k not in ("batch_size", "num_draws")} for r in reports],
    }
