"""The second and third log p(x) estimators (AIS, the paper's Appendix D) against exact values and
against importance sampling, and the HMC kernel they share."""

import numpy as np
import pytest
import torch

from aevb_dist.data.sources import read_idx
from aevb_dist.model.elbo import sgvb_b
from aevb_dist.model.hmc import adapt_step_size, hmc_step
from aevb_dist.model.marginal_likelihood import estimate_log_marginal_likelihood
from aevb_dist.model.vae import VAE
from tests.helpers import shared_data
from tests.linear_gaussian import exact_log_marginal, make_model, sample_data


def test_hmc_leaves_a_correlated_gaussian_invariant():
    cov = (
        torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
        * torch.tensor([[4.0], [0.25]]).sqrt()
        * torch.tensor([[4.0, 0.25]]).sqrt()
    )
    target = torch.distributions.MultivariateNormal(torch.tensor([1.0, -2.0], dtype=torch.float64), cov)
    gen = torch.Generator().manual_seed(0)
    z = torch.zeros(64, 1, 2, dtype=torch.float64)
    step = torch.full((1,), 0.1, dtype=torch.float64)
    kept = []
    for t in range(1500):
        z, accept = hmc_step(target.log_prob, z, step, 5, gen)
        if t < 300:
            step = adapt_step_size(step, accept)
        else:
            kept.append(z[:, 0])
    draws = torch.cat(kept[::5])
    torch.testing.assert_close(draws.mean(0), target.mean, atol=0.06, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), cov, atol=0.12, rtol=0.05)


@pytest.mark.parametrize("estimator", ["ais", "appendix-d"])
def test_estimator_converges_to_the_exact_log_marginal(estimator):
    vae, params = make_model(exact_posterior=False)  # q is not the posterior: AIS and Appendix D do not use it
    x = sample_data(params, 32)
    truth = exact_log_marginal(params, x)
    errors = {}
    for steps in (9, 1000):
        est = estimate_log_marginal_likelihood(
            vae,
            x,
            estimator,
            num_samples=16,
            num_steps=steps,
            num_leapfrog=5,
            generator=torch.Generator().manual_seed(0),
        )
        errors[steps] = (est - truth).abs().mean().item()
    assert errors[1000] < 0.08 and errors[9] > 2 * errors[1000], errors


@pytest.fixture(scope="module")
def mnist_3_latent():
    """A 784-200-3 Bernoulli VAE trained briefly on 10,000 real MNIST digits (dynamically binarized)."""
    pixels = read_idx(shared_data("mnist/train-images-idx3-ubyte.gz")).reshape(-1, 784)[:10_100]
    intensities = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vae = VAE(784, [200], 3)
    opt = torch.optim.Adam(vae.parameters(), 3e-3)
    for _ in range(1500):
        batch = intensities[torch.randint(0, 10_000, (100,), generator=gen)]
        loss = -sgvb_b(vae, torch.bernoulli(batch, generator=gen), 1, generator=gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = torch.bernoulli(intensities[10_000:10_012], generator=gen)
    return vae.eval(), held_out


def test_ais_and_appendix_d_agree_with_importance_sampling_on_a_trained_3_latent_mnist_model(mnist_3_latent):
    vae, x = mnist_3_latent
    reference = estimate_log_marginal_likelihood(
        vae, x, "is", num_samples=5000, generator=torch.Generator().manual_seed(1)
    )
    assert (reference < -20).all()  # a real, non-trivial log p(x)
    found = {}
    for estimator in ("ais", "appendix-d"):
        found[estimator] = estimate_log_marginal_likelihood(
            vae,
            x,
            estimator,
            num_samples=16,
            num_steps=1000,
            num_leapfrog=5,
            generator=torch.Generator().manual_seed(2),
        )
        diff = found[estimator] - reference
        se = diff.std() / diff.numel() ** 0.5  # standard error of the mean of paired differences
        assert diff.mean().abs() < 3 * se + 0.05, (estimator, diff.mean().item(), se.item(), diff.tolist())
    # The two HMC-based estimators share nothing with q(z|x) and agree digit by digit. (Where both sit
    # above importance sampling, q misses part of the posterior: IS with q under-estimates there.)
    gap = (found["ais"] - found["appendix-d"]).abs()
    assert gap.max() < 0.6, gap.tolist()


def test_unknown_estimator_and_bad_sizes_are_refused():
    vae, params = make_model()
    x = sample_data(params, 2)
    with pytest.raises(ValueError, match="'harmonic' is not one of: is, ais, appendix-d"):
        estimate_log_marginal_likelihood(vae, x, "harmonic")
    with pytest.raises(ValueError, match="num_chains must be a positive integer"):
        estimate_log_marginal_likelihood(vae, x, "ais", num_samples=0)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 3"):
        estimate_log_marginal_likelihood(vae, x, "appendix-d", num_steps=2)
