"""Posterior families (the paper's three reparameterization routes) and the continuous Bernoulli
likelihood, each held to torch.distributions and to closed forms."""

import math

import pytest
import torch
from scipy import stats
from torch import distributions as D

from aevb_dist.model.distributions import ContinuousBernoulliLikelihood
from aevb_dist.model.elbo import sgvb_a, sgvb_b
from aevb_dist.model.posteriors import POSTERIORS, posterior_from_name
from aevb_dist.model.vae import VAE

A = torch.tensor([[-0.7, 0.3, 1.2]], dtype=torch.float64)
B = torch.tensor([[-1.0, 0.2, 0.6]], dtype=torch.float64)


def reference(name: str, a: torch.Tensor, b: torch.Tensor) -> D.Distribution:
    """The same distribution, as torch.distributions builds it."""
    if name == "gaussian":
        return D.Normal(a, torch.exp(0.5 * b))
    if name == "gaussian_log_std":
        return D.Normal(a, b.exp())
    if name == "laplace":
        return D.Laplace(a, b.exp())
    if name == "logistic":
        return D.TransformedDistribution(
            D.Uniform(torch.zeros_like(a), torch.ones_like(a)),
            [D.SigmoidTransform().inv, D.AffineTransform(a, b.exp())],
        )
    if name == "kumaraswamy":
        return D.Kumaraswamy(a.exp(), b.exp())
    if name == "lognormal":
        return D.LogNormal(a, torch.exp(0.5 * b))
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_reparameterized_samples_follow_the_family(name):
    fam = posterior_from_name(name)
    ours = fam.sample(A, B, 20_000, generator=torch.Generator().manual_seed(0))
    theirs = reference(name, A, B).sample((20_000,))
    for j in range(A.shape[1]):
        # Two-sample Kolmogorov–Smirnov test against torch's own sampler, per latent.
        assert stats.ks_2samp(ours[:, 0, j].numpy(), theirs[:, 0, j].numpy()).pvalue > 1e-3, (name, j)


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_log_density_matches_torch_distributions(name):
    fam = posterior_from_name(name)
    z = fam.sample(A, B, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fam.log_prob(z, A, B), reference(name, A, B).log_prob(z).sum(-1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_closed_form_kl_to_the_prior_equals_its_monte_carlo_estimate(name):
    fam = posterior_from_name(name)
    z = fam.sample(A, B, 400_000, generator=torch.Generator().manual_seed(2))
    log_ratio = fam.log_prob(z, A, B) - D.Normal(0.0, 1.0).log_prob(z).sum(-1)
    se = log_ratio.std(0) / math.sqrt(z.shape[0])
    closed = fam.kl_to_standard_normal(A, B)
    assert ((log_ratio.mean(0) - closed).abs() < 4 * se).all(), (name, log_ratio.mean(0), closed, se)
    first, second = fam.moments(A, B)
    for closed_moment, draws in ((first, z), (second, z.pow(2))):
        draws_se = draws.std(0) / math.sqrt(z.shape[0])
        assert ((draws.mean(0) - closed_moment).abs() < 5 * draws_se).all(), (name, draws.mean(0), closed_moment)
    ref = reference(name, A, B)
    if name != "logistic":  # TransformedDistribution has no entropy
        torch.testing.assert_close(fam.entropy(A, B), ref.entropy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_pathwise_gradients_equal_the_gradient_of_the_closed_form_mean(name):
    """∇ E_q[z + z²] by the reparameterization trick (averaged over draws) = ∇ of it in closed form."""
    fam = posterior_from_name(name)
    a, b = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    z = fam.sample(a, b, 400_000, generator=torch.Generator().manual_seed(3))
    pathwise = torch.autograd.grad((z + z.pow(2)).mean(0).sum(), (a, b))
    exact = torch.autograd.grad(sum(fam.moments(a, b)).sum(), (a, b))
    for got, want in zip(pathwise, exact):
        assert torch.isfinite(got).all() and got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.01)


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_estimators_a_and_b_agree_for_every_family(name):
    """B's closed-form KL makes it an unbiased estimate of the same ELBO that A estimates."""
    torch.manual_seed(0)
    vae = VAE(5, [8], 2, likelihood="gaussian", posterior=name).double()
    x = torch.rand(4, 5, dtype=torch.float64)
    a = torch.stack([sgvb_a(vae, x, 5000).detach() for _ in range(8)])
    b = torch.stack([sgvb_b(vae, x, 5000).detach() for _ in range(8)])
    se = (a.var(0) / 8 + b.var(0) / 8).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 4 * se + 1e-6).all(), (name, a.mean(0), b.mean(0))


def test_continuous_bernoulli_matches_torch_and_is_normalized():
    lik = ContinuousBernoulliLikelihood()
    eta = torch.tensor([-30.0, -3.0, -0.5, -0.009, -1e-5, 0.0, 2e-4, 0.011, 0.7, 4.0, 25.0], dtype=torch.float64)
    x = torch.linspace(0.0, 1.0, eta.numel(), dtype=torch.float64)
    for value in (x, torch.zeros_like(x), torch.ones_like(x)):
        ours = torch.stack([lik.log_prob(e.view(1, 1), v.view(1, 1)) for e, v in zip(eta, value)]).view(-1)
        torch.testing.assert_close(ours, D.ContinuousBernoulli(logits=eta).log_prob(value), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(lik.mean(eta), D.ContinuousBernoulli(logits=eta).mean, rtol=1e-6, atol=1e-7)
    # A density on [0, 1]: it integrates to one (trapezoid rule), unlike the Bernoulli's "density".
    grid = torch.linspace(0.0, 1.0, 20_001, dtype=torch.float64)
    for e in (-4.0, -0.003, 0.0, 1.5):
        dens = lik.log_prob(torch.full((grid.numel(), 1), e, dtype=torch.float64), grid[:, None]).exp()
        assert torch.trapezoid(dens, grid).item() == pytest.approx(1.0, abs=1e-6)


def test_continuous_bernoulli_refuses_inputs_outside_the_unit_interval():
    vae = VAE(3, [4], 2, likelihood="continuous_bernoulli")
    with pytest.raises(ValueError, match=r"continuous_bernoulli decoder needs inputs in \[0, 1\]"):
        sgvb_b(vae, torch.tensor([[0.2, 1.5, 0.1]]))


def test_unknown_family_names_are_refused_naming_the_choices():
    from aevb_dist.config import load_config

    with pytest.raises(
        ValueError,
        match="model.posterior='student'.*gaussian, gaussian_log_std, laplace, logistic, kumaraswamy, lognormal",
    ):
        load_config(None, ["model.posterior=student"])
    with pytest.raises(ValueError, match="model.likelihood='gamma'.*continuous_bernoulli.*negative_binomial, zinb"):
        load_config(None, ["model.likelihood=gamma"])
