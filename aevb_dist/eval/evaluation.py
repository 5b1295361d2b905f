"""Dataset-level ELBO, importance-sampled log p(x) and posterior encodings, row group by row group.

No Ray here: `jobs.py` deals row groups to Ray tasks and adds up what they return.
Results are sums, sums of squares and counts (divided once, at the end), and the noise
for a row group is seeded by (seed, row group) (seeds.py), so the dataset result does not depend on
how many workers computed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import numpy as np
import torch

from aevb_dist import seeds
from aevb_dist.data.epoch_stream import to_model_input
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.eval.model_input import model_input
from aevb_dist.model.elbo import evaluation_bound
from aevb_dist.model.marginal_likelihood import estimate_log_marginal_likelihood
from aevb_dist.model.vae import VAE
from aevb_dist.names import EVAL_BATCH_SIZE


def open_as_trained(data_uri: str, vae: VAE, saved: dict, endpoint_url: Optional[str] = None) -> ParquetDataset:
    """`data_uri` opened for a checkpoint's model: its input size, and encoded images read from the column the
    run trained on (`data.image_column` of the saved config)."""
    return ParquetDataset(
        data_uri,
        expected_dim=vae.input_dim,
        endpoint_url=endpoint_url,
        image_column=saved["config"]["data"].get("image_column"),
        covariate_columns=tuple(saved["config"]["model"].get("covariates") or ()),
    )


# A latent is active when Cov_x(E_q[z_u | x]) exceeds this (Burda et al., 2015, §5.2).
ACTIVE_UNIT_THRESHOLD = 1e-2


@dataclass
class Sums:
    count: int = 0
    elbo: float = 0.0
    elbo_sq: float = 0.0
    log_px: float = 0.0
    log_px_sq: float = 0.0
    # Per latent: Σ_x E_q[z|x] and Σ_x E_q[z|x]², for the active units (None until an example is seen).
    z_mean: Optional[np.ndarray] = None
    z_mean_sq: Optional[np.ndarray] = None
    # Σ_x KL(q(z|x) || p(z)), where the model has it in closed form (the ELBO is then reconstruction − KL).
    kl: Optional[float] = None
    # Models of labelled counts: each cell's E_q[z|x] [n, Z] and label [n], to cluster (rows, not sums).
    labelled_means: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None

    def __add__(self, other: "Sums") -> "Sums":
        def add(name: str, a, b):
            if a is None or b is None:
                return b if a is None else a
            return np.concatenate([a, b]) if name in ("labelled_means", "labels") else a + b

        return Sums(**{f.name: add(f.name, getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})

    def posterior_mean_variance(self) -> np.ndarray:
        """Cov_x(E_q[z_u | x]) per latent u over the examples seen (their sample variance)."""
        mean = self.z_mean / self.count
        return np.maximum(self.z_mean_sq / self.count - mean**2, 0.0) * self.count / max(self.count - 1, 1)

    def active(self) -> np.ndarray:
        """Whether each latent is active (Burda et al., 2015, §5.2)."""
        return self.posterior_mean_variance() > ACTIVE_UNIT_THRESHOLD

    def active_units_by_layer(self, latent_dims: list[int]) -> list[int]:
        """Active latents in each stochastic layer, the layers' latents side by side as the model keeps them."""
        return [int(layer.sum()) for layer in np.split(self.active(), np.cumsum(latent_dims)[:-1])]

    def summary(self) -> dict:
        """Means and standard errors of the mean over examples."""
        if self.count == 0:
            raise ValueError("no examples were evaluated")

        def mean_sem(total: float, total_sq: float) -> tuple[float, float]:
            mean = total / self.count
            var = max(total_sq / self.count - mean * mean, 0.0) * self.count / max(self.count - 1, 1)
            return mean, math.sqrt(var / self.count)

        elbo, elbo_sem = mean_sem(self.elbo, self.elbo_sq)
        out = {"elbo": elbo, "elbo_sem": elbo_sem, "num_examples": self.count}
        if self.kl is not None:  # the ELBO's two terms (eq. 7): E_q[log p(x|z)] and KL(q(z|x) || p(z))
            out["reconstruction"], out["kl"] = elbo + self.kl / self.count, self.kl / self.count
        if self.z_mean is not None:
            out["active_units"] = int(self.active().sum())
        if self.log_px or self.log_px_sq:
            out["log_marginal_likelihood"], out["log_marginal_likelihood_sem"] = mean_sem(self.log_px, self.log_px_sq)
        return out


def row_group_generator(seed: int, unit_id: int, draw: str, device: torch.device) -> torch.Generator:
    """A row group's noise for the ELBO or for log p(x) (seeds.row_group_seed): the same on any worker (on a
    GPU, the device's own stream of the same seed)."""
    return torch.Generator(device=device).manual_seed(seeds.row_group_seed(seed, unit_id, draw))


def _batches(dataset: ParquetDataset, unit_id: int, batch_size: int, binarization: str, seed: int):
    batch = to_model_input(dataset, dataset.read_raw(dataset.units[unit_id]), binarization, seed=seed, epoch=0)
    for start in range(0, len(batch), batch_size):
        yield batch.rows(start, start + batch_size)


@torch.no_grad()
def evaluate_units(
    vae: VAE,
    dataset: ParquetDataset,
    unit_ids: list[int],
    *,
    num_importance_samples: int,
    chunk_size: int = 100,
    batch_size: int = EVAL_BATCH_SIZE,
    binarization: str = "static",
    seed: int = 0,
    estimator: str = "is",
    num_steps: int = 500,
    num_leapfrog: int = 10,
    on_unit: Optional[Callable[[int], None]] = None,
) -> Sums:
    """ELBO (`evaluation_bound`: estimator B, or A for a stack of stochastic layers; L=1) and, with K > 0, log p(x)
    by `estimator` (see marginal_likelihood.py) over the given row groups. K is the number of importance
    samples, or of chains for ais/appendix-d."""
    vae.eval()
    device = next(vae.parameters()).device
    total = Sums()
    for uid in unit_ids:
        elbo_noise = row_group_generator(seed, uid, seeds.ELBO, device)
        log_px_noise = row_group_generator(seed, uid, seeds.LOG_PX, device)
        for batch in _batches(dataset, uid, batch_size, binarization, seed):
            x = model_input(batch, device)
            elbo = evaluation_bound(vae, x, generator=elbo_noise).double()
            if vae.has_analytic_kl:  # q(z|x)'s parameters once, for its mean and its KL
                a_BZ, b_BZ = vae.encode(x)
                z_mean, kl = vae.posterior.mean_and_std(a_BZ, b_BZ)[0].double(), vae.kl_to_prior(a_BZ, b_BZ)
            else:
                z_mean, kl = vae.posterior_moments(x)[0].double(), None
            clustered = vae.likelihood.models_counts and batch.label is not None
            total += Sums(
                count=len(batch),
                elbo=elbo.sum().item(),
                elbo_sq=elbo.pow(2).sum().item(),
                z_mean=z_mean.sum(0).cpu().numpy(),
                z_mean_sq=z_mean.pow(2).sum(0).cpu().numpy(),
                kl=None if kl is None else kl.double().sum().item(),
                labelled_means=z_mean.float().cpu().numpy() if clustered else None,
                labels=batch.label if clustered else None,
            )
            if num_importance_samples > 0:
                log_px = estimate_log_marginal_likelihood(
                    vae,
                    x,
                    estimator,
                    num_samples=num_importance_samples,
                    chunk_size=chunk_size,
                    num_steps=num_steps,
                    num_leapfrog=num_leapfrog,
                    generator=log_px_noise,
                ).double()
                total += Sums(log_px=log_px.sum().item(), log_px_sq=log_px.pow(2).sum().item())
        if on_unit is not None:
            on_unit(dataset.units[uid].num_rows)
    return total


@torch.no_grad()
def encode_units(
    vae: VAE, dataset: ParquetDataset, unit_ids: list[int], *, binarization: str, seed: int, batch_size: int = 1000
) -> dict[str, np.ndarray]:
    """Posterior q_φ(z|x) per example: mean and standard deviation [N, Z], with index, label and the codes of the
    covariates the model is conditioned on [N, C], where the data has them."""
    vae.eval()
    parts: dict[str, list[np.ndarray]] = {"index": [], "label": [], "mean": [], "std": []}
    for uid in unit_ids:
        for batch in _batches(dataset, uid, batch_size, binarization, seed):
            mean, std = vae.posterior_moments(model_input(batch, torch.device("cpu")))
            parts["index"].append(batch.index)
            parts["mean"].append(mean.numpy())
            parts["std"].append(std.numpy())
            if batch.label is not None:
                parts["label"].append(batch.label)
            if batch.covariates is not None:
                parts.setdefault("covariates", []).append(batch.covariates)
    out = {k: np.concatenate(v) for k, v in parts.items() if v}
    if "mean" not in out:
        out.update(
            index=np.zeros(0, np.int64),
            mean=np.zeros((0, vae.latent_dim), np.float32),
            std=np.zeros((0, vae.latent_dim), np.float32),
        )
    return out
