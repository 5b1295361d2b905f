"""`aevb-dist variance`: the ELBO gradient's variance under estimators A, B and IWAE on one batch of a
dataset, for a trained model (the math is `model/gradient_variance.py`)."""

from __future__ import annotations

from typing import Optional

import torch

from aevb_dist.data.epoch_stream import EpochStream
from aevb_dist.eval.evaluation import open_as_trained
from aevb_dist.eval.model_input import model_input
from aevb_dist.eval.saved_model import model_from_bytes, saved_eval_binarization
from aevb_dist.model.gradient_variance import variance_sweep
from aevb_dist.run.checkpoint import load_checkpoint_bytes


def checkpoint_gradient_variance(
    checkpoint_uri: str,
    data_uri: str,
    *,
    batch_size: int,
    estimators: tuple[str, ...],
    latent_samples: list[int],
    num_draws: int,
    seed: int,
    endpoint_url: Optional[str] = None,
) -> dict:
    """The variance report of `variance_sweep` on the first (seeded) batch of `data_uri`."""
    vae, saved = model_from_bytes(*load_checkpoint_bytes(checkpoint_uri, endpoint_url))
    if "B" in estimators and not vae.has_analytic_kl:
        raise ValueError(
            f"estimator B needs a KL in closed form; this model has {len(vae.latent_dims)} stochastic layers "
            "(model.latent_layers), whose KL has none: ask for the others (--estimators A iwae)"
        )
    data = open_as_trained(data_uri, vae, saved, endpoint_url)
    binarization = saved_eval_binarization(vae, saved)
    batch = next(
        iter(
            EpochStream(
                data, rank=0, world_size=1, batch_size=batch_size, epoch=0, seed=seed, binarization=binarization
            )
        )
    )
    return variance_sweep(
        vae,
        model_input(batch, torch.device("cpu")),
        estimators=estimators,
        latent_samples=latent_samples,
        num_draws=num_draws,
        seed=seed,
    )
