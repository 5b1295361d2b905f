"""Every name the config (or a command) accepts is one that builds and runs; the lists are kept once, in
aevb_dist/names.py, and every torch registry refuses to load out of step with them."""

import itertools

import numpy as np
import pytest
import torch

from aevb_dist import names
from aevb_dist.config import load_config
from aevb_dist.data.binarization import binarize
from aevb_dist.data.schema import Batch
from aevb_dist.model.elbo import per_example_bound
from aevb_dist.model.marginal_likelihood import estimate_log_marginal_likelihood
from aevb_dist.model.vae import VAE
from aevb_dist.train.optimizers import build_optimizer
from tests.helpers import SMOKE


def tiny_model(**model) -> VAE:
    overrides = [f"model.{k}={v}" for k, v in {"input_dim": 6, "hidden_sizes": "[5]", "latent_dim": 2, **model}.items()]
    return VAE.from_config(load_config(SMOKE, overrides).model, seed=0)


def data_for(vae: VAE) -> torch.Tensor:
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(0))
    if vae.likelihood.models_counts:
        return torch.floor(x * 8)
    return (x > 0.5).float() if vae.likelihood.name == "bernoulli" else x


@pytest.mark.parametrize(
    "activation, likelihood, posterior", list(itertools.product(names.ACTIVATIONS, names.LIKELIHOODS, names.POSTERIORS))
)
def test_every_model_the_config_accepts_builds_and_gives_finite_bounds(activation, likelihood, posterior):
    vae = tiny_model(activation=activation, likelihood=likelihood, posterior=posterior)
    x = data_for(vae)
    for estimator in names.ESTIMATORS:
        bound = per_example_bound(vae, x, estimator, 2, generator=torch.Generator().manual_seed(1))
        assert bound.shape == (3,) and torch.isfinite(bound).all(), estimator


@pytest.mark.parametrize("estimator", names.MARGINAL_LIKELIHOOD_ESTIMATORS)
def test_every_log_marginal_likelihood_estimator_runs(estimator):
    vae = tiny_model()
    log_px = estimate_log_marginal_likelihood(
        vae,
        data_for(vae),
        estimator,
        num_samples=4,
        chunk_size=2,
        num_steps=4,
        num_leapfrog=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert log_px.shape == (3,) and torch.isfinite(log_px).all()


@pytest.mark.parametrize("name", names.OPTIMIZERS)
def test_every_optimizer_builds_and_steps(name):
    load_config(SMOKE, [f"optim.name={name}"])  # accepted by the config
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer([weight], name, 0.1)
    weight.sum().backward()
    optimizer.step()
    assert (weight < 1).all()


@pytest.mark.parametrize("mode", names.BINARIZATIONS)
def test_every_binarization_runs(mode):
    load_config(SMOKE, [f"data.binarization={mode}"])
    batch = Batch(np.full((2, 4), 0.5, np.float32), np.arange(2))
    out = binarize(batch, mode, seed=0, epoch=0)
    assert out.x.shape == (2, 4) and set(np.unique(out.x)) <= ({0.0, 1.0} if mode != "none" else {0.5})


def test_a_registry_out_of_step_with_the_names_is_refused():
    names.require_registry("activation", names.ACTIVATIONS, names.ACTIVATIONS)
    with pytest.raises(RuntimeError, match=r"missing \['elu'\], not listed \['gelu'\]"):
        names.require_registry("activation", names.ACTIVATIONS, [*names.ACTIVATIONS[:-1], "gelu"])


def test_a_name_outside_the_lists_is_refused_by_the_config():
    for key in (
        "model.activation",
        "model.likelihood",
        "model.posterior",
        "train.estimator",
        "optim.name",
        "data.binarization",
        "train.allreduce_dtype",
        "train.on_nonfinite",
    ):
        with pytest.raises(ValueError, match=f"{key}='nope' is not allowed; choose one of"):
            load_config(SMOKE, [f"{key}=nope"])
