"""Stacks of stochastic layers (`model.latent_layers`, model/hierarchical.py): held to the closed forms of a
two-layer linear-Gaussian model, every layer's gradients to finite differences, and trained from a config."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch

from aevb_dist.config import load_config, to_dict, unused_keys
from aevb_dist.eval import saved_model
from aevb_dist.eval.jobs import encode, evaluate
from aevb_dist.eval.plotting import plot_run
from aevb_dist.model.elbo import evaluation_bound, iwae_bound, sgvb_a
from aevb_dist.model.hierarchical import HierarchicalVAE, model_from_config
from aevb_dist.model.marginal_likelihood import ais_log_marginal_likelihood, log_marginal_likelihood
from aevb_dist.run import checkpoint
from aevb_dist.train.driver import train
from aevb_dist.train.worker import trainer_for_config
from tests.helpers import SMOKE, tiny_overrides

D, Z1, Z2 = 4, 2, 1
TWO_LAYERS = "model.latent_layers=[{latent_dim: 3, hidden_sizes: [8]}, {latent_dim: 2, hidden_sizes: [4]}]"


def _linear_gaussian(seed: int = 0) -> tuple[HierarchicalVAE, dict]:
    """z2 ~ N(0, 1), z1 | z2 ~ N(A z2 + c, S1), x | z1 ~ N(W z1 + b, σ² I): every marginal and posterior is Gaussian.
    q(z1|x) is the exact posterior's mean with its marginal variances a little inflated (a diagonal q cannot hold
    the correlation); q(z2|z1) is the exact p(z2 | z1, x) = p(z2 | z1)."""
    g = torch.Generator().manual_seed(seed)
    vae = HierarchicalVAE(D, [(Z1, []), (Z2, [])], likelihood="gaussian").double()
    A, c = torch.randn(Z1, Z2, generator=g, dtype=torch.float64), torch.randn(Z1, generator=g, dtype=torch.float64)
    W, b = torch.randn(D, Z1, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    s1_sq, sigma_sq = torch.tensor([0.3, 0.6], dtype=torch.float64), 0.25
    cov1 = A @ A.T + torch.diag(s1_sq)
    precision = torch.linalg.inv(cov1) + W.T @ W / sigma_sq  # of p(z1 | x)
    post_cov = torch.linalg.inv(precision)
    M = post_cov @ W.T / sigma_sq
    m0 = post_cov @ (torch.linalg.solve(cov1, c) - W.T @ b / sigma_sq)
    z2_var = 1.0 / (1.0 + (A.T @ (A / s1_sq[:, None])).squeeze())  # of p(z2 | z1)
    G = z2_var * (A.T / s1_sq)  # p(z2 | z1)'s mean is G (z1 − c)
    with torch.no_grad():
        for layer in (vae.decoder[0], vae.conditional_priors[0][0], *[e[0] for e in vae.encoders]):
            layer.weight.zero_()
            layer.bias.zero_()
        dec, prior, enc1, enc2 = vae.decoder[0], vae.conditional_priors[0][0], vae.encoders[0][0], vae.encoders[1][0]
        dec.weight[:D], dec.bias[:D], dec.bias[D:] = W, b, math.log(sigma_sq)
        prior.weight[:Z1], prior.bias[:Z1], prior.bias[Z1:] = A, c, s1_sq.log()
        enc1.weight[:Z1], enc1.bias[:Z1], enc1.bias[Z1:] = M, m0, post_cov.diagonal().log() + 0.3
        enc2.weight[:Z2], enc2.bias[:Z2], enc2.bias[Z2:] = G, -G @ c, z2_var.log()
    marginal = torch.distributions.MultivariateNormal(W @ c + b, W @ cov1 @ W.T + sigma_sq * torch.eye(D))
    return vae, {"A": A, "c": c, "W": W, "b": b, "s1_sq": s1_sq, "sigma_sq": sigma_sq, "cov1": cov1, "x": marginal}


def test_the_joint_density_is_the_product_of_the_layers_conditionals():
    vae, p = _linear_gaussian()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, D, generator=g, dtype=torch.float64)
    z = torch.randn(7, 5, Z1 + Z2, generator=g, dtype=torch.float64)
    z1, z2 = z[..., :Z1], z[..., Z1:]
    normal = torch.distributions.Normal
    expected = (
        normal(0.0, 1.0).log_prob(z2).sum(-1)
        + normal(z2 @ p["A"].T + p["c"], p["s1_sq"].sqrt()).log_prob(z1).sum(-1)
        + normal(z1 @ p["W"].T + p["b"], math.sqrt(p["sigma_sq"])).log_prob(x).sum(-1)
    )
    torch.testing.assert_close(vae.log_joint(x, z), expected)


def test_ancestral_draws_have_the_priors_moments():
    vae, p = _linear_gaussian()
    like = torch.zeros((), dtype=torch.float64)
    z = vae.sample_prior((200_000,), like, torch.Generator().manual_seed(2))
    z1, z2 = z[:, :Z1], z[:, Z1:]
    assert (z2.mean(0).abs() < 0.01).all() and (z2.var(0) - 1).abs().max() < 0.02
    assert (z1.mean(0) - p["c"]).abs().max() < 0.02
    assert (torch.cov(z1.T) - p["cov1"]).abs().max() < 0.05 * p["cov1"].abs().max()


def test_importance_sampling_and_ais_find_the_exact_log_marginal_likelihood_and_the_bounds_sit_below_it():
    vae, p = _linear_gaussian()
    torch.manual_seed(3)  # torch.distributions draws from the global generator only
    x = p["x"].sample(torch.Size([6]))
    exact = p["x"].log_prob(x)
    g = torch.Generator().manual_seed(3)
    torch.testing.assert_close(log_marginal_likelihood(vae, x, 5000, generator=g), exact, atol=0.05, rtol=0)
    ais = ais_log_marginal_likelihood(vae, x, num_chains=64, num_steps=500, generator=g)
    torch.testing.assert_close(ais, exact, atol=0.2, rtol=0)  # 16 chains, 500 steps: within ~0.1
    elbo = torch.stack([sgvb_a(vae, x, 2000, generator=g) for _ in range(2)]).mean(0)
    iwae = torch.stack([iwae_bound(vae, x, 50, generator=g) for _ in range(200)]).mean(0)
    assert (elbo < iwae - 1e-3).all() and (iwae < exact).all(), (elbo, iwae, exact)
    assert not vae.has_analytic_kl
    torch.testing.assert_close(
        evaluation_bound(vae, x, torch.Generator().manual_seed(4)), sgvb_a(vae, x, 1, torch.Generator().manual_seed(4))
    )


def test_every_layers_gradient_matches_finite_differences():
    """The IWAE bound through both q layers (reparameterized) and both p layers, in float64."""
    torch.manual_seed(0)
    vae = HierarchicalVAE(6, [(3, [5]), (2, [4])], likelihood="bernoulli").double()
    x = torch.bernoulli(torch.full((4, 6), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(5))

    def bound() -> torch.Tensor:
        return iwae_bound(vae, x, 3, generator=torch.Generator().manual_seed(6)).sum()

    bound().backward()
    networks = {
        "q(z1|x)": vae.encoders[0],
        "q(z2|z1)": vae.encoders[1],
        "p(z1|z2)": vae.conditional_priors[0],
        "p(x|z1)": vae.decoder,
    }
    for name, network in networks.items():
        weight = network[0].weight
        assert weight.grad is not None and weight.grad.abs().sum() > 0, name
        for index in [(0, 0), (1, 1)]:
            with torch.no_grad():
                weight[index] += 1e-6
                up = bound().item()
                weight[index] -= 2e-6
                down = bound().item()
                weight[index] += 1e-6
            assert abs((up - down) / 2e-6 - weight.grad[index].item()) < 1e-5, (name, index)
    groups = vae.parameter_groups()
    assert sum(t.numel() for t in groups["encoder"] + groups["decoder"]) == sum(t.numel() for t in vae.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([TWO_LAYERS, "train.estimator=B"], "train.estimator=B needs the KL to the prior in closed form"),
        ([TWO_LAYERS, "train.estimator=A", "model.posterior=laplace"], "Gaussian conditionals"),
        ([TWO_LAYERS, "train.estimator=A", "model.architecture=conv"], "does not combine with model.architecture"),
        (["model.latent_layers=[{latent_dim: 0}]", "train.estimator=A"], r"model.latent_layers\[0\].latent_dim=0"),
        (["model.latent_layers=[{latent_dim: 2, hidden: [3]}]"], r"model.latent_layers\[\].hidden'; allowed keys"),
    ],
)
def test_a_stack_that_cannot_work_is_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(SMOKE, overrides)


def test_a_two_layer_model_trains_from_its_config_and_comes_back_from_its_checkpoint(tiny_data, tmp_path):
    cfg = load_config(
        SMOKE,
        tiny_overrides(tiny_data, str(tmp_path), **{"train.max_steps": 120, "train.eval_every_steps": 40})
        + [TWO_LAYERS, "train.estimator=iwae", "train.num_latent_samples=3", "optim.name=adam", "optim.lr=0.01"],
    )
    trainer = trainer_for_config(cfg)
    assert isinstance(trainer.vae, HierarchicalVAE) and trainer.vae.latent_dims == [3, 2]
    rows, saved = [], []
    trainer.fit(on_log=rows.append, on_checkpoint=lambda state, row: saved.append(state))
    tests = [r["test_elbo"] for r in rows if r["test_elbo"] == r["test_elbo"]]
    assert len(tests) >= 3 and tests[-1] > tests[0] + 0.5, tests
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    checkpoint.save(str(folder), saved[-1], to_dict(cfg))
    vae, _ = saved_model.model_from_bytes((folder / checkpoint.STATE).read_bytes())
    x = torch.rand(5, 16).round()
    z = trainer.vae.sample_prior((3, 5), x)
    torch.testing.assert_close(vae.log_joint(x, z), trainer.vae.log_joint(x, z))
    rebuilt = model_from_config(cfg.model, seed=cfg.seed)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in vae.parameters()]


def test_the_one_layer_keys_a_stack_does_not_read_are_named_when_set():
    assert unused_keys(load_config(SMOKE, [TWO_LAYERS, "train.estimator=A"])) == [
        "model.latent_dim and model.hidden_sizes not used: model.latent_layers sets each layer's latent_dim and "
        "hidden_sizes"
    ]
    assert (
        unused_keys(
            load_config(SMOKE, [TWO_LAYERS, "train.estimator=A", "model.latent_dim=20", "model.hidden_sizes=[500]"])
        )
        == []
    )
    assert unused_keys(load_config(SMOKE)) == []  # one layer reads them


@pytest.mark.slow
def test_a_two_layer_run_resumes_and_is_evaluated_encoded_and_plotted(ray_local, tiny_data, tmp_path, capsys):
    overrides = tiny_overrides(tiny_data, str(tmp_path)) + [
        TWO_LAYERS,
        "train.estimator=iwae",
        "train.num_latent_samples=3",
        "train.num_workers=2",
        "ray.local_mode=true",
    ]
    train(load_config(SMOKE, overrides + ["train.max_steps=8"]))
    assert "warning: model.latent_dim and model.hidden_sizes not used" in capsys.readouterr().err
    assert train(load_config(SMOKE, overrides + ["train.max_steps=16"]))["step"] == 16  # resumed at 8
    run = f"{tmp_path}/smoke"
    result = evaluate(run, f"{tiny_data}/test", num_importance_samples=50, num_workers=1)
    assert result["num_examples"] == 30 and result["log_marginal_likelihood"] > result["elbo"]  # IWAE₅₀ ≥ ELBO
    assert (
        len(result["active_units_per_layer"]) == 2 and sum(result["active_units_per_layer"]) == result["active_units"]
    )
    ais = evaluate(run, f"{tiny_data}/test", num_importance_samples=4, num_workers=1, estimator="ais", num_steps=20)
    assert math.isfinite(ais["log_marginal_likelihood"]) and ais["elbo"] == result["elbo"]
    assert encode(run, f"{tiny_data}/test", str(tmp_path / "codes"), num_workers=1) == 30
    codes = pq.read_table(str(tmp_path / "codes")).to_pydict()
    assert len(codes["mean"][0]) == len(codes["std"][0]) == 3 + 2  # both layers, side by side
    capsys.readouterr()
    written = plot_run(run)
    assert any(uri.endswith("samples.png") for uri in written)
    assert not any(uri.endswith("manifold.png") for uri in written)
    assert "plot: no manifold.png: the 2-D manifold (Figure 4) needs one layer of 2 latents; this model has 3 + 2" in (
        capsys.readouterr().err
    )


def test_a_stack_reads_every_scale_output_as_log_sigma_with_gaussian_log_std():
    torch.manual_seed(0)
    vae = HierarchicalVAE(6, [(3, [5]), (2, [4])], posterior="gaussian_log_std").double()
    z = torch.randn(4, 3, 5, dtype=torch.float64)
    z1, z2 = z[..., :3], z[..., 3:]
    mean, log_std = vae.conditional_priors[0](z2).chunk(2, dim=-1)
    normal = torch.distributions.Normal
    expected = normal(0.0, 1.0).log_prob(z2).sum(-1) + normal(mean, log_std.exp()).log_prob(z1).sum(-1)
    torch.testing.assert_close(vae.log_prior(z), expected)
    with pytest.raises(ValueError, match="model.posterior=laplace is not one"):
        HierarchicalVAE(6, [(3, [5]), (2, [4])], posterior="laplace")
