"""A stack of stochastic layers (Burda et al., 2015, §5), and the model a config's `model` section describes.

    p_θ(x, z_1, …, z_L) = p(z_L) ∏_{l<L} p_θ(z_l | z_{l+1}) · p_θ(x | z_1),   p(z_L) = N(0, I)
    q_φ(z_1, …, z_L | x) = q_φ(z_1 | x) ∏_{l<L} q_φ(z_{l+1} | z_l)

Every conditional is a diagonal Gaussian whose (μ, log σ²) an mlp computes (Appendix C.2's parameterization,
layer by layer; (μ, log σ) with model.posterior=gaussian_log_std, as Burda et al.'s code). The recognition path
climbs from x to z_L; the generative path mirrors it. The latents travel as one vector z = [z_1, …, z_L] of
Σ_l Z_l values, so the estimators that treat z as one vector (IWAE, estimator A, importance sampling, AIS and
HMC) serve this model and the one-layer `VAE` alike, through the same methods: `sample_posterior`, `log_joint`,
`log_prior`, `log_likelihood`, `sample_prior`, `posterior_moments`.

Shapes: B batch, D data dimension, Z all latents, Z_l one layer's, L samples.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from aevb_dist.model.distributions import likelihood_from_name, log_standard_normal
from aevb_dist.model.networks import mlp
from aevb_dist.model.posteriors import Gaussian, posterior_from_name
from aevb_dist.model.vae import VAE, SharedParts, seeded


class HierarchicalVAE(SharedParts, nn.Module):
    # Estimator B needs KL(q(z_1..z_L|x) || p(z_1..z_L)) in closed form; the layers couple it, so there is none.
    has_analytic_kl = False

    def __init__(
        self,
        input_dim: int,
        layers: list[tuple[int, list[int]]],
        activation: str = "tanh",
        likelihood: str = "bernoulli",
        squash_mean: bool = False,
        init_std: Optional[float] = None,
        init: str = "default",
        output_bias_init: str = "default",
        validate_inputs: bool = True,
        posterior: str = "gaussian",
    ):
        """`layers`: (latent_dim, hidden_sizes) of each stochastic layer from x upward; layer l's hidden sizes
        are those of q_φ(z_l | the layer below), mirrored in p_θ(the layer below | z_l)."""
        super().__init__()
        self.input_dim = input_dim
        self.covariate_sizes = ()  # conditioning on covariates is the one-layer VAE's (the config check refuses it)
        self.latent_dims = [dim for dim, _ in layers]
        self.latent_dim = sum(self.latent_dims)
        self.likelihood = likelihood_from_name(likelihood, squash_mean=squash_mean, input_dim=input_dim)
        self.posterior = posterior_from_name(posterior)  # every conditional's Gaussian, in q and in p alike
        if not isinstance(self.posterior, Gaussian):
            raise ValueError(f"model.latent_layers has Gaussian conditionals; model.posterior={posterior} is not one")
        below = [input_dim] + self.latent_dims[:-1]  # what each layer is inferred from
        # q_φ(z_l | below_l): below_l → (μ, log σ²) of z_l (log σ with gaussian_log_std).
        self.encoders = nn.ModuleList(
            mlp(width, list(hidden), 2 * dim, activation) for width, (dim, hidden) in zip(below, layers)
        )
        # p_θ(z_l | z_{l+1}) for l < L: z_{l+1} → (μ, log σ²) of z_l, layer l+1's hidden sizes mirrored.
        self.conditional_priors = nn.ModuleList(
            mlp(above, list(reversed(hidden)), 2 * dim, activation)
            for (dim, _), (above, hidden) in zip(layers[:-1], layers[1:])
        )
        # p_θ(x | z_1): the first layer's hidden sizes mirrored.
        self.decoder = mlp(
            self.latent_dims[0], list(reversed(layers[0][1])), self.likelihood.params_per_dim * input_dim, activation
        )
        self.initialize(init_std, init, output_bias_init, self.likelihood.params_per_dim * input_dim)
        self.validate_inputs = validate_inputs

    @classmethod
    def from_config(cls, model_cfg, *, seed: Optional[int] = None, validate_inputs: bool = True) -> "HierarchicalVAE":
        def build() -> "HierarchicalVAE":
            return cls(
                input_dim=model_cfg.input_dim,
                layers=[(layer.latent_dim, list(layer.hidden_sizes)) for layer in model_cfg.latent_layers],
                activation=model_cfg.activation,
                likelihood=model_cfg.likelihood,
                squash_mean=model_cfg.squash_mean,
                init_std=model_cfg.init_std,
                init=model_cfg.init,
                output_bias_init=model_cfg.output_bias_init,
                validate_inputs=validate_inputs,
                posterior=model_cfg.posterior,
            )

        return seeded(build, seed)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The recognition model's parameters φ (every q_φ layer) and the generative model's θ."""
        generative = [*self.generative_parameters(), *self.conditional_priors.parameters()]
        return {"encoder": list(self.encoders.parameters()), "decoder": generative}

    def split(self, z_LBZ: torch.Tensor) -> list[torch.Tensor]:
        """[z_1, …, z_L], each [..., Z_l]."""
        return list(torch.split(z_LBZ, self.latent_dims, dim=-1))

    def sample_posterior(
        self, x_BD: torch.Tensor, num_samples: int, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z ~ q_φ(z_1..z_L | x), each layer by the reparameterization trick given the one below, with
        log q_φ(z|x): [L, B, Z] and [L, B]."""
        self.check_input(x_BD)
        a_BZ, b_BZ = self.encoders[0](self.likelihood.encoder_input(x_BD)).chunk(2, dim=-1)
        z_LBZ = self.posterior.sample(a_BZ, b_BZ, num_samples, generator)
        log_q_LB = self.posterior.log_prob(z_LBZ, a_BZ, b_BZ)
        layers = [z_LBZ]
        for encoder in self.encoders[1:]:
            a_LBZ, b_LBZ = encoder(layers[-1]).chunk(2, dim=-1)
            z_LBZ = self.posterior.sample(a_LBZ, b_LBZ, 1, generator)[0]
            log_q_LB = log_q_LB + self.posterior.log_prob(z_LBZ, a_LBZ, b_LBZ)
            layers.append(z_LBZ)
        return torch.cat(layers, dim=-1), log_q_LB

    def log_prior(self, z_LBZ: torch.Tensor) -> torch.Tensor:
        """log p_θ(z_1..z_L) = log N(z_L; 0, I) + Σ_{l<L} log p_θ(z_l | z_{l+1}), [L, B]."""
        layers = self.split(z_LBZ)
        log_p = log_standard_normal(layers[-1])
        for z_below, z_above, prior in zip(layers[:-1], layers[1:], self.conditional_priors):
            a, b = prior(z_above).chunk(2, dim=-1)
            log_p = log_p + self.posterior.log_prob(z_below, a, b)
        return log_p

    def log_likelihood(self, x_BD: torch.Tensor, z_LBZ: torch.Tensor) -> torch.Tensor:
        """log p_θ(x | z_1), [L, B]."""
        return self.likelihood.log_prob(self.decoder(self.split(z_LBZ)[0]), x_BD)

    def log_joint(self, x_BD: torch.Tensor, z_LBZ: torch.Tensor) -> torch.Tensor:
        """log p_θ(x, z_1..z_L), [L, B]."""
        return self.log_likelihood(x_BD, z_LBZ) + self.log_prior(z_LBZ)

    def sample_prior(self, shape: tuple[int, ...], like: torch.Tensor, generator=None) -> torch.Tensor:
        """z ~ p_θ(z_1..z_L) by ancestral sampling from z_L down, [*shape, Z]."""
        top = torch.randn((*shape, self.latent_dims[-1]), generator=generator, dtype=like.dtype, device=like.device)
        layers = [top]
        for prior in reversed(self.conditional_priors):
            a, b = prior(layers[0]).chunk(2, dim=-1)
            layers.insert(0, self.posterior.sample(a, b, 1, generator)[0])
        return torch.cat(layers, dim=-1)

    def posterior_moments(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each layer's mean and standard deviation, [B, Z]: q_φ(z_1|x)'s, then q_φ(z_{l+1} | z_l) taken at the
        mean of z_l (the deterministic upward pass; E_q[z_{l+1}|x] itself has no closed form)."""
        self.check_input(x_BD)
        means, stds, below = [], [], x_BD
        for encoder in self.encoders:
            mean, std = self.posterior.mean_and_std(*encoder(below).chunk(2, dim=-1))
            means.append(mean)
            stds.append(std)
            below = mean
        return torch.cat(means, dim=-1), torch.cat(stds, dim=-1)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Means of p_θ(x|z_1) for z ~ p(z): [num_samples, D]."""
        return self.decode_mean(self.sample_prior((num_samples,), next(self.parameters()), generator))

    @torch.no_grad()
    def decode_mean(self, z_BZ: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(self.split(z_BZ)[0]))


def model_from_config(model_cfg, *, seed: Optional[int] = None, validate_inputs: bool = True):
    """The model of a config's `model` section: a stack when `model.latent_layers` lists layers, else the VAE
    of `model.latent_dim` and `model.hidden_sizes` (`VAE.from_config` says what `seed` does)."""
    kind = HierarchicalVAE if model_cfg.latent_layers else VAE
    return kind.from_config(model_cfg, seed=seed, validate_inputs=validate_inputs)
