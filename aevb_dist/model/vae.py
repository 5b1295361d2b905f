"""The latent-variable model p_θ(z) p_θ(x|z) and its recognition model q_φ(z|x).

No loss, no device and no distributed code here: estimators live in `elbo.py`.

Shapes: B batch, D data dimension, Z latent dimension, L latent samples, P decoder outputs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from aevb_dist.model.distributions import likelihood_from_name, log_standard_normal
from aevb_dist.model.networks import (
    ShapedNetwork,
    check_contract,
    conv_networks,
    init_glorot_uniform,
    init_paper,
    mlp,
    user_factory,
)
from aevb_dist.model.posteriors import posterior_from_name


def seeded(build: Callable[[], nn.Module], seed: Optional[int]) -> nn.Module:
    """`build()`; with `seed`, its initial parameters are a function of it (every rank builds the same model)
    and torch's global random state is left as it was."""
    if seed is None:
        return build()
    # nn.Linear initializes from the global generator and takes no other: seed a private copy of it.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: the model is built on the CPU
        return build()


def covariate_sizes_of(model_cfg) -> tuple[int, ...]:
    """model.covariate_sizes, which `train` fills in from the data for model.covariates."""
    if model_cfg.covariates and model_cfg.covariate_sizes is None:
        raise ValueError("model.covariate_sizes is unset: `train` fills it in from the data's covariates")
    return tuple(model_cfg.covariate_sizes or ()) if model_cfg.covariates else ()


class SharedParts:
    """What the one-layer VAE and a stack of layers (hierarchical.py) share: their input check, their initial
    parameters, and the mlp decoder's output bias (`self.decoder`: the network of p_θ(x|z), or of p_θ(x|z_1))."""

    decoder: nn.Sequential

    def initialize(self, init_std: Optional[float], init: str, output_bias_init: str, num_outputs: int) -> None:
        """model.init_std (the paper's N(0, init_std²)), model.init and model.output_bias_init=zero."""
        if init_std is not None:
            init_paper(self, init_std)
        if init == "glorot_uniform":
            init_glorot_uniform(self)
        if output_bias_init == "zero":
            self.set_output_bias(torch.zeros(num_outputs))

    def generative_parameters(self) -> list[nn.Parameter]:
        """θ of p_θ(x|z): the decoder's, and the likelihood's own where it has some (NB's dispersion)."""
        own = list(self.likelihood.parameters()) if isinstance(self.likelihood, nn.Module) else []
        return list(self.decoder.parameters()) + own

    def check_input(self, x_BD: torch.Tensor) -> None:
        width = self.input_dim + len(self.covariate_sizes)
        if x_BD.dim() != 2 or x_BD.shape[1] != width:
            raise ValueError(f"expected inputs of shape [batch, {width}], got {list(x_BD.shape)}")
        if self.validate_inputs:
            data_BD, _ = self.split_observation(x_BD)
            self.likelihood.validate(data_BD)

    def split_observation(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x's modelled columns [B, D], and the one-hot codes [B, K] of the covariates the model conditions on
        (None without): with `covariate_sizes`, x's last columns are each row's covariate codes (the reader
        appends them, eval/model_input.py). Conditioning, not modelled: scVI's batch covariate."""
        if not self.covariate_sizes:
            return x_BD, None
        codes_BC = x_BD[..., self.input_dim :].long()
        one_hot_BK = torch.cat(
            [F.one_hot(codes_BC[..., i], size) for i, size in enumerate(self.covariate_sizes)], -1
        ).to(x_BD.dtype)
        return x_BD[..., : self.input_dim], one_hot_BK

    @staticmethod
    def conditioned(h: torch.Tensor, one_hot_BK: Optional[torch.Tensor]) -> torch.Tensor:
        """A network's input h [..., B, H] with the covariates' one-hot codes beside it (the same for every
        sample of a row's latents)."""
        if one_hot_BK is None:
            return h
        return torch.cat([h, one_hot_BK.expand(*h.shape[:-1], one_hot_BK.shape[-1])], -1)

    @torch.no_grad()
    def set_output_bias(self, bias_P: torch.Tensor) -> None:
        """The mlp decoder's last layer's bias: the decoder's outputs at zero hidden activations."""
        last = self.decoder[-1]
        last.bias.copy_(bias_P.to(last.bias))

    @torch.no_grad()
    def set_output_bias_to_data_mean(self, mean_D: torch.Tensor) -> None:
        """Bernoulli logits of the data's mean pixel, clipped to [0.001, 0.999] (Burda et al.'s code): the
        decoder starts at the data's average image instead of grey."""
        self.set_output_bias(torch.logit(mean_D.double().clamp(0.001, 0.999)).float())


class VAE(SharedParts, nn.Module):
    has_analytic_kl = True  # KL(q_φ(z|x) || p(z)) in closed form for every family of posteriors.py (estimator B)

    def __init__(
        self,
        input_dim: int,
        hidden_sizes: list[int],
        latent_dim: int,
        activation: str = "tanh",
        likelihood: str = "bernoulli",
        squash_mean: bool = False,
        init_std: Optional[float] = None,
        posterior: str = "gaussian",
        validate_inputs: bool = True,
        architecture: str = "mlp",
        input_shape: Optional[list[int]] = None,
        conv_channels: Optional[list[int]] = None,
        model_cfg=None,
        init: str = "default",
        output_bias_init: str = "default",
        covariate_sizes: tuple[int, ...] = (),
    ):
        """`architecture`: "mlp" (the paper's), "conv" (for images of `input_shape`), or a user's
        "package.module:factory", called as factory(model_cfg, input_shape, params_per_dim) → (encoder,
        decoder) with the shapes networks.py states. `covariate_sizes`: the categories of each covariate both
        networks are conditioned on (mlp only), one-hot beside x and beside z."""
        super().__init__()
        self.input_dim = input_dim
        self.covariate_sizes = tuple(covariate_sizes)
        if self.covariate_sizes and architecture != "mlp":
            raise ValueError(f"model.covariates condition model.architecture=mlp networks, not {architecture!r}")
        conditioning = sum(self.covariate_sizes)
        self.latent_dim = latent_dim
        self.likelihood = likelihood_from_name(likelihood, squash_mean=squash_mean, input_dim=input_dim)
        self.posterior = posterior_from_name(posterior)
        self.architecture = architecture
        if architecture == "mlp":
            # Encoder: x → the two parameters per latent of q_φ(z|x); for the default diagonal
            # Gaussian, (μ, log σ²) (Appendix C.2). See posteriors.py for the other families.
            self.encoder = mlp(input_dim + conditioning, hidden_sizes, 2 * latent_dim, activation)
            # Decoder mirrors the encoder: z → parameters of p_θ(x|z).
            self.decoder = mlp(
                latent_dim + conditioning,
                list(reversed(hidden_sizes)),
                self.likelihood.params_per_dim * input_dim,
                activation,
            )
        else:
            self._shaped_networks(
                architecture, list(input_shape or [input_dim]), conv_channels or [32, 64], activation, model_cfg
            )
        self.initialize(init_std, init, output_bias_init, self.likelihood.params_per_dim * input_dim)
        # Checks every input's finiteness and support. The trainer builds its model without it: its
        # reader has already checked every row group, and the check costs passes over each batch.
        self.validate_inputs = validate_inputs

    def _shaped_networks(
        self, architecture: str, shape: list[int], channels: list[int], activation: str, model_cfg
    ) -> None:
        size = 1
        for n in shape:
            size *= n
        if size != self.input_dim:
            raise ValueError(f"model.input_shape={shape} holds {size} values, model.input_dim={self.input_dim}")
        p = self.likelihood.params_per_dim
        if architecture == "conv":
            encoder, decoder = conv_networks(shape, self.latent_dim, p, channels, activation)
        else:
            built = user_factory(architecture)(model_cfg, tuple(shape), p)
            if not (isinstance(built, tuple) and len(built) == 2 and all(isinstance(m, nn.Module) for m in built)):
                raise ValueError(
                    f"model.architecture={architecture!r} must return (encoder, decoder), two "
                    f"torch.nn.Module; it returned {type(built).__name__}"
                )
            encoder, decoder = built
        check_contract(encoder, decoder, shape, self.latent_dim, p, f"model.architecture={architecture!r}")
        self.encoder = ShapedNetwork(encoder, shape, "encoder")
        self.decoder = ShapedNetwork(decoder, shape, "decoder")

    @classmethod
    def from_config(cls, model_cfg, *, seed: Optional[int] = None, validate_inputs: bool = True) -> "VAE":
        """The model of a config's `model` section. With `seed`, the initial parameters are a function of
        it (every rank builds the same model) and torch's global random state is left as it was."""

        def build() -> "VAE":
            return cls(
                input_dim=model_cfg.input_dim,
                hidden_sizes=list(model_cfg.hidden_sizes),
                latent_dim=model_cfg.latent_dim,
                activation=model_cfg.activation,
                likelihood=model_cfg.likelihood,
                squash_mean=model_cfg.squash_mean,
                init_std=model_cfg.init_std,
                posterior=model_cfg.posterior,
                validate_inputs=validate_inputs,
                architecture=model_cfg.architecture,
                input_shape=model_cfg.input_shape,
                conv_channels=list(model_cfg.conv_channels),
                model_cfg=model_cfg,
                init=model_cfg.init,
                output_bias_init=model_cfg.output_bias_init,
                covariate_sizes=covariate_sizes_of(model_cfg),
            )

        return seeded(build, seed)

    @property
    def latent_dims(self) -> list[int]:
        """Each stochastic layer's latents: one layer here."""
        return [self.latent_dim]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The recognition model's parameters φ and the generative model's θ."""
        return {"encoder": list(self.encoder.parameters()), "decoder": self.generative_parameters()}

    def encode(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parameters (a, b) of q_φ(z|x), each [B, Z]: (μ, log σ²) for the Gaussian."""
        self.check_input(x_BD)
        data_BD, one_hot_BK = self.split_observation(x_BD)
        a_BZ, b_BZ = self.encoder(self.conditioned(self.likelihood.encoder_input(data_BD), one_hot_BK)).chunk(2, -1)
        return a_BZ, b_BZ

    def sample_latent(
        self, a_BZ: torch.Tensor, b_BZ: torch.Tensor, num_samples: int, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """The reparameterization trick, z = g_φ(ε, x) (paper, eq. 10 for the Gaussian: z = μ + σ ⊙ ε). [L, B, Z]."""
        return self.posterior.sample(a_BZ, b_BZ, num_samples, generator)

    def decode(self, z_LBZ: torch.Tensor, one_hot_BK: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw decoder outputs (logits, or mean and log-variance), [..., P]; a model conditioned on covariates
        needs their one-hot codes (`split_observation`)."""
        if self.covariate_sizes and one_hot_BK is None:
            raise ValueError("this model's decoder is conditioned on covariates (model.covariates): give their codes")
        return self.decoder(self.conditioned(z_LBZ, one_hot_BK))

    def log_likelihood(self, x_BD: torch.Tensor, z_LBZ: torch.Tensor) -> torch.Tensor:
        """log p_θ(x|z), [L, B]."""
        data_BD, one_hot_BK = self.split_observation(x_BD)
        return self.likelihood.log_prob(self.decode(z_LBZ, one_hot_BK), data_BD)

    @staticmethod
    def log_prior(z_LBZ: torch.Tensor) -> torch.Tensor:
        """log p_θ(z) = log N(z; 0, I), [L, B]."""
        return log_standard_normal(z_LBZ)

    def log_joint(self, x_BD: torch.Tensor, z_LBZ: torch.Tensor) -> torch.Tensor:
        """log p_θ(x, z) = log p_θ(x|z) + log p_θ(z), [L, B]."""
        return self.log_likelihood(x_BD, z_LBZ) + self.log_prior(z_LBZ)

    def sample_posterior(
        self, x_BD: torch.Tensor, num_samples: int, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z_l ~ q_φ(z|x) by the reparameterization trick, with log q_φ(z_l|x): [L, B, Z] and [L, B]."""
        a_BZ, b_BZ = self.encode(x_BD)
        z_LBZ = self.sample_latent(a_BZ, b_BZ, num_samples, generator)
        return z_LBZ, self.log_posterior(z_LBZ, a_BZ, b_BZ)

    def sample_prior(self, shape: tuple[int, ...], like: torch.Tensor, generator=None) -> torch.Tensor:
        """z ~ p_θ(z), [*shape, Z], in `like`'s dtype and device."""
        return torch.randn((*shape, self.latent_dim), generator=generator, dtype=like.dtype, device=like.device)

    def posterior_moments(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and standard deviation of q_φ(z|x), each [B, Z]."""
        return self.posterior.mean_and_std(*self.encode(x_BD))

    def log_posterior(self, z_LBZ: torch.Tensor, a_BZ: torch.Tensor, b_BZ: torch.Tensor) -> torch.Tensor:
        """log q_φ(z|x), [L, B]."""
        return self.posterior.log_prob(z_LBZ, a_BZ, b_BZ)

    def kl_to_prior(self, a_BZ: torch.Tensor, b_BZ: torch.Tensor) -> torch.Tensor:
        """KL(q_φ(z|x) || p_θ(z)) in closed form, [B] (Appendix B for the Gaussian)."""
        return self.posterior.kl_to_standard_normal(a_BZ, b_BZ)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Means of p_θ(x|z) for z ~ p(z): [num_samples, D]."""
        z = self.sample_prior((num_samples,), next(self.parameters()), generator)
        return self.likelihood.mean(self.decode(z))

    @torch.no_grad()
    def decode_mean(self, z_BZ: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.decode(z_BZ))
