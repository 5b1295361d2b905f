"""The count likelihoods of model/distributions.py against scipy.stats, and their gradients against finite
differences."""

import numpy as np
import pytest
import torch
from scipy import stats

from aevb_dist.model.distributions import likelihood_from_name
from aevb_dist.model.vae import VAE

D = 6


def _counts(seed=0, rows=5):
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.3, size=(rows, D)).astype(np.float64)
    x[0] = 0.0  # a cell without counts
    x[1, :3] = 0.0
    return torch.from_numpy(x)


def _outputs(likelihood, rows, samples=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, rows, likelihood.params_per_dim * D, generator=g, dtype=torch.float64)


def _mean(out_LBP, x_BD):
    library_B1 = x_BD.sum(-1, keepdim=True).clamp_min(1.0)
    return (library_B1 * torch.softmax(out_LBP[..., :D], -1)).numpy()


def test_poisson_is_scipys_poisson_with_the_observed_library_size():
    lik, x = likelihood_from_name("poisson", input_dim=D).double(), _counts()
    out = _outputs(lik, len(x))
    expected = stats.poisson.logpmf(x.numpy(), _mean(out, x)).sum(-1)
    np.testing.assert_allclose(lik.log_prob(out, x).numpy(), expected, rtol=1e-10)


def test_multinomial_is_scipys_multinomial():
    lik, x = likelihood_from_name("multinomial", input_dim=D).double(), _counts()
    out = _outputs(lik, len(x))
    rho = torch.softmax(out, -1).numpy()
    n = x.sum(-1).numpy()
    expected = np.array(
        [[stats.multinomial.logpmf(x[b].numpy(), n[b], rho[s, b]) for b in range(len(x))] for s in range(3)]
    )
    np.testing.assert_allclose(lik.log_prob(out, x).numpy(), expected, rtol=1e-10)


def _nb_reference(x, mean, theta):
    """scipy's nbinom(n, p) is the number of failures before n successes: n = θ, p = θ / (θ + μ)."""
    return stats.nbinom.logpmf(x, theta, theta / (theta + mean))


@pytest.mark.parametrize("theta_scale", [0.05, 1.0, 40.0])
def test_negative_binomial_is_scipys_nbinom_with_a_gene_wise_inverse_dispersion(theta_scale):
    lik, x = likelihood_from_name("negative_binomial", input_dim=D).double(), _counts()
    with torch.no_grad():
        lik.log_inverse_dispersion_D.copy_(torch.linspace(-1, 1, D, dtype=torch.float64) + np.log(theta_scale))
    out = _outputs(lik, len(x))
    theta = lik.log_inverse_dispersion_D.detach().exp().numpy()
    expected = _nb_reference(x.numpy(), _mean(out, x), theta).sum(-1)
    np.testing.assert_allclose(lik.log_prob(out, x).detach().numpy(), expected, rtol=1e-9)


def test_zinb_is_the_mixture_of_a_point_mass_at_zero_and_scipys_nbinom():
    lik, x = likelihood_from_name("zinb", input_dim=D).double(), _counts()
    out = _outputs(lik, len(x))
    theta = lik.log_inverse_dispersion_D.detach().exp().numpy()
    dropout = torch.sigmoid(out[..., D:]).numpy()
    nb = np.exp(_nb_reference(x.numpy(), _mean(out, x), theta))
    expected = np.log(np.where(x.numpy() == 0, dropout, 0.0) + (1 - dropout) * nb).sum(-1)
    np.testing.assert_allclose(lik.log_prob(out, x).detach().numpy(), expected, rtol=1e-9)


def test_zinb_without_dropout_is_the_negative_binomial():
    zinb = likelihood_from_name("zinb", input_dim=D).double()
    nb = likelihood_from_name("negative_binomial", input_dim=D).double()
    x = _counts()
    out = _outputs(nb, len(x))
    never_dropped = torch.cat([out, torch.full_like(out, -60.0)], -1)  # π = sigmoid(−60) ≈ 1e-26
    np.testing.assert_allclose(
        zinb.log_prob(never_dropped, x).detach().numpy(), nb.log_prob(out, x).detach().numpy(), rtol=1e-12
    )


@pytest.mark.parametrize("name", ["poisson", "negative_binomial", "zinb", "multinomial"])
def test_gradients_match_finite_differences(name):
    lik, x = likelihood_from_name(name, input_dim=D).double(), _counts(rows=3)
    out = _outputs(lik, len(x), samples=2).requires_grad_(True)
    if list(lik.parameters()):  # θ's gradient too, by perturbing the parameter itself
        theta = lik.log_inverse_dispersion_D
        lik.log_prob(out, x).sum().backward()
        analytic = theta.grad.clone()
        numeric = torch.zeros_like(theta)
        for d in range(D):
            with torch.no_grad():
                theta[d] += 1e-6
                up = lik.log_prob(out, x).sum()
                theta[d] -= 2e-6
                down = lik.log_prob(out, x).sum()
                theta[d] += 1e-6
            numeric[d] = (up - down) / 2e-6
        np.testing.assert_allclose(analytic.numpy(), numeric.numpy(), rtol=1e-5, atol=1e-7)
    assert torch.autograd.gradcheck(lambda o: lik.log_prob(o, x), (out,))


def test_a_count_model_reads_log1p_counts_and_refuses_non_counts():
    vae = VAE(input_dim=D, hidden_sizes=[8], latent_dim=2, likelihood="negative_binomial")
    x = _counts().float()
    a, _ = vae.encode(x)
    np.testing.assert_allclose(a.detach(), vae.encoder(torch.log1p(x)).chunk(2, -1)[0].detach())
    with pytest.raises(ValueError, match="counts"):
        vae.encode(x + 0.5)
    with pytest.raises(ValueError, match="counts"):
        vae.encode(-x - 1)


def test_the_dispersion_is_part_of_theta_its_state_and_its_optimizer():
    vae = VAE(input_dim=D, hidden_sizes=[8], latent_dim=2, likelihood="zinb")
    assert "likelihood.log_inverse_dispersion_D" in vae.state_dict()
    assert any(p is vae.likelihood.log_inverse_dispersion_D for p in vae.parameter_groups()["decoder"])
    assert any(p is vae.likelihood.log_inverse_dispersion_D for p in vae.parameters())
    # The decoder's outputs: proportions and dropout logits per gene.
    assert vae.decoder[-1].out_features == 2 * D
    means = vae.sample(4)
    assert means.shape == (4, D)
    np.testing.assert_allclose(means.sum(-1).numpy(), 1.0, rtol=1e-5)
