"""The SGVB estimators, the IWAE bound and log p(x), held to closed forms."""

import math

import pytest
import torch

from aevb_dist.model.distributions import kl_diag_gaussian_to_standard_normal
from aevb_dist.model.elbo import iwae_bound, log_parameter_prior, map_objective_sum, sgvb_a, sgvb_b
from aevb_dist.model.marginal_likelihood import log_marginal_likelihood
from aevb_dist.model.posteriors import Gaussian
from aevb_dist.model.vae import VAE
from tests.linear_gaussian import analytic_elbo, exact_log_marginal, make_model, sample_data


def test_exact_posterior_makes_every_bound_tight():
    vae, params = make_model(exact_posterior=True)
    x = sample_data(params, 16)
    truth = exact_log_marginal(params, x)
    # With q = p(z|x) every importance weight equals p(x): zero variance, exact equality.
    torch.testing.assert_close(sgvb_a(vae, x, 3), truth, rtol=0, atol=1e-9)
    torch.testing.assert_close(iwae_bound(vae, x, 7), truth, rtol=0, atol=1e-9)
    torch.testing.assert_close(log_marginal_likelihood(vae, x, 5000, chunk_size=333), truth, rtol=0, atol=1e-9)
    assert sgvb_a(vae, x).shape == (16,)


def test_importance_sampling_converges_to_exact_log_marginal():
    vae, params = make_model(exact_posterior=False)
    x = sample_data(params, 32)
    truth = exact_log_marginal(params, x)
    torch.manual_seed(0)
    errors = {
        k: (log_marginal_likelihood(vae, x, k, chunk_size=256) - truth).abs().mean().item() for k in (1, 10, 100, 5000)
    }
    assert errors[5000] < 0.03, errors
    assert errors[1] > errors[100] > errors[5000], errors


def test_analytic_kl_equals_monte_carlo_kl():
    torch.manual_seed(0)
    mean = torch.randn(4, 3, dtype=torch.float64)
    logvar = torch.randn(4, 3, dtype=torch.float64) * 0.5
    q = Gaussian()
    z = q.sample(mean, logvar, 200_000)
    mc = q.log_prob(z, mean, logvar) - VAE.log_prior(z)
    se = mc.std(0) / math.sqrt(z.shape[0])
    closed = kl_diag_gaussian_to_standard_normal(mean, logvar)
    assert ((mc.mean(0) - closed).abs() < 4 * se).all(), (mc.mean(0), closed, se)


def test_estimators_a_and_b_agree_in_expectation_with_the_analytic_elbo():
    vae, params = make_model(exact_posterior=False)
    x = sample_data(params, 8)
    torch.manual_seed(1)
    exact = analytic_elbo(vae, x).detach()
    for estimator in (sgvb_a, sgvb_b):
        draws = torch.stack([estimator(vae, x, 1000).detach() for _ in range(20)])  # 20 × L=1000
        se = draws.std(0) / math.sqrt(draws.shape[0])
        assert ((draws.mean(0) - exact).abs() < 4 * se + 1e-9).all(), (estimator.__name__, draws.mean(0), exact)


def test_reparameterized_gradients_match_the_analytic_elbo_gradient():
    vae, params = make_model(exact_posterior=False)
    x = sample_data(params, 4)
    enc = vae.encoder[0]
    exact = torch.autograd.grad(analytic_elbo(vae, x).sum(), [enc.weight, enc.bias])
    torch.manual_seed(3)
    for estimator in (sgvb_a, sgvb_b):
        mc = torch.autograd.grad(estimator(vae, x, 100_000).sum(), [enc.weight, enc.bias])
        for got, want in zip(mc, exact):
            assert got.abs().sum() > 0, "no gradient reached the encoder"
            torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_bounds_are_ordered_and_iwae_grows_with_k():
    vae, params = make_model(exact_posterior=False)
    x = sample_data(params, 16)
    truth = exact_log_marginal(params, x).mean().item()
    torch.manual_seed(4)

    def expected(fn, reps=400):
        return torch.stack([fn().detach() for _ in range(reps)]).mean().item()

    elbo = expected(lambda: sgvb_b(vae, x))
    iwae = [expected(lambda k=k: iwae_bound(vae, x, k)) for k in (1, 5, 50)]
    assert elbo < iwae[1] < iwae[2] < truth, (elbo, iwae, truth)
    # K=1 is estimator A itself: the same noise gives the same value.
    same_a = sgvb_a(vae, x, 1, generator=torch.Generator().manual_seed(5))
    same_iwae = iwae_bound(vae, x, 1, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(same_iwae, same_a)


def test_gradients_flow_to_encoder_and_decoder_of_a_deep_bernoulli_model():
    torch.manual_seed(0)
    vae = VAE(input_dim=20, hidden_sizes=[16, 8], latent_dim=2, activation="tanh", likelihood="bernoulli")
    x = (torch.rand(5, 20) > 0.5).float()
    for estimator in (sgvb_a, sgvb_b):
        vae.zero_grad()
        (-estimator(vae, x, 2).mean()).backward()
        for name, p in vae.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bernoulli_decoder_rejects_inputs_outside_unit_interval():
    vae = VAE(input_dim=4, hidden_sizes=[3], latent_dim=2)
    with pytest.raises(ValueError, match=r"bernoulli decoder needs inputs in \[0, 1\]"):
        sgvb_b(vae, torch.tensor([[0.0, 1.0, 2.0, 0.5]]), 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        sgvb_b(vae, torch.tensor([[0.0, float("nan"), 0.0, 0.5]]), 1)
    with pytest.raises(ValueError, match=r"shape \[batch, 4\]"):
        sgvb_b(vae, torch.zeros(2, 5), 1)
    with pytest.raises(ValueError, match="num_importance_samples"):
        log_marginal_likelihood(vae, torch.zeros(2, 4), 0)


def test_map_prior_matches_torch_distributions_and_scales_by_dataset_size():
    torch.manual_seed(0)
    vae = VAE(input_dim=5, hidden_sizes=[4], latent_dim=2)
    normal = torch.distributions.Normal(0.0, 0.3)
    want = sum(normal.log_prob(p).sum() for p in vae.parameters())
    torch.testing.assert_close(log_parameter_prior(vae, 0.3), want)
    elbo_sum = torch.tensor(-10.0)
    got = map_objective_sum(elbo_sum, vae, 0.3, batch_size=50, dataset_size=1000)
    torch.testing.assert_close(got, elbo_sum + 0.05 * want)
    assert map_objective_sum(elbo_sum, vae, None, 50, 1000) is elbo_sum


def test_prior_gradient_in_closed_form_equals_backpropagating_the_map_term():
    """The trainer adds (M/N) θ/σ² to each gradient instead of backpropagating map_objective_sum's prior
    term: the same gradient, for an int batch size and for a 0-d tensor (the captured CUDA-graph step)."""
    from aevb_dist.model.elbo import add_prior_gradient

    torch.manual_seed(0)
    vae = VAE(input_dim=5, hidden_sizes=[4], latent_dim=2)
    params = list(vae.parameters())
    elbo_sum = sgvb_b(vae, torch.rand(50, 5).round(), 1).sum()
    want = torch.autograd.grad(-map_objective_sum(elbo_sum, vae, 0.3, 50, 1000), params, retain_graph=True)
    for batch_size in (50, torch.tensor(50.0)):
        for p in params:
            p.grad = None
        (-elbo_sum).backward(retain_graph=True)
        add_prior_gradient(params, 0.3, batch_size, 1000)
        for p, g in zip(params, want):
            torch.testing.assert_close(p.grad, g)
    before = [p.grad.clone() for p in params]
    add_prior_gradient(params, None, 50, 1000)  # maximum likelihood: nothing added
    add_prior_gradient(params, 0.3, 0, 1000)  # an empty batch carries no prior term
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
