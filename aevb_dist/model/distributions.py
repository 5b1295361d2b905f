"""Log densities used by the model, and the decoder likelihoods p_θ(x|z).

This module is the only place a likelihood is chosen by name. Pure torch.

Shapes: B batch, D data dimension (pixels, or genes), Z latent dimension, L latent samples, P decoder outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aevb_dist import names

LOG_2PI = math.log(2.0 * math.pi)


def log_normal_diag(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mean).pow(2) * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension: the prior p_θ(z)."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def kl_diag_gaussian_to_standard_normal(mean_BZ: torch.Tensor, logvar_BZ: torch.Tensor) -> torch.Tensor:
    """KL(q_φ(z|x) || N(0, I)) in closed form (paper, Appendix B):
    −KL = ½ Σ_j (1 + log σ_j² − μ_j² − σ_j²)."""
    return -0.5 * (1.0 + logvar_BZ - mean_BZ.pow(2) - logvar_BZ.exp()).sum(-1)


class Likelihood:
    """A decoder likelihood: how many outputs per pixel, and log p_θ(x|z) from them."""

    name: str
    params_per_dim: int
    models_counts = False  # True: x holds counts (genes of a cell, words of a document), not intensities

    def encoder_input(self, x_BD: torch.Tensor) -> torch.Tensor:
        """What q_φ(z|x)'s network reads of x."""
        return x_BD

    def validate(self, x_BD: torch.Tensor) -> None:
        if not torch.isfinite(x_BD).all():
            raise ValueError(f"inputs to a {self.name} decoder contain NaN or inf values")

    def log_prob(self, out_LBP: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, out_BP: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class BernoulliLikelihood(Likelihood):
    """Decoder outputs logits; log p(x|z) = Σ x log y + (1 − x) log(1 − y) (Appendix C.1)."""

    name = "bernoulli"
    params_per_dim = 1

    def validate(self, x_BD: torch.Tensor) -> None:
        super().validate(x_BD)
        if x_BD.numel() and (x_BD.min() < 0 or x_BD.max() > 1):
            raise ValueError(
                f"a {self.name} decoder needs inputs in [0, 1], got values in "
                f"[{x_BD.min().item():.4g}, {x_BD.max().item():.4g}]; scale the data or use model.likelihood=gaussian"
            )

    def log_prob(self, out_LBP: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        # x log σ(η) + (1 − x) log(1 − σ(η)) = x·η − softplus(η): stable for any logit, and two passes
        # over the [L, B, D] logits where −BCE-with-logits takes several (it dominates log p(x) at K=5000).
        logits = out_LBP
        return torch.linalg.vecdot(logits, x_BD) - F.softplus(logits).sum(-1)

    def mean(self, out_BP: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out_BP)


class GaussianLikelihood(Likelihood):
    """Decoder outputs a mean and a log-variance per pixel (Appendix C.2)."""

    name = "gaussian"
    params_per_dim = 2

    def __init__(self, squash_mean: bool = False):
        # Frey Face: means constrained to (0, 1) with a sigmoid (paper, Section 5).
        self.squash_mean = squash_mean

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = out.chunk(2, dim=-1)
        return (torch.sigmoid(mean) if self.squash_mean else mean), logvar

    def log_prob(self, out_LBP: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        mean, logvar = self._split(out_LBP)
        return log_normal_diag(x_BD, mean, logvar)

    def mean(self, out_BP: torch.Tensor) -> torch.Tensor:
        return self._split(out_BP)[0]


class ContinuousBernoulliLikelihood(BernoulliLikelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019) for intensities in [0, 1]:
    p(x|λ) = C(λ) λ^x (1 − λ)^(1−x), a proper density on [0, 1] where the Bernoulli "likelihood"
    of a grey pixel is not one. Decoder outputs logits η, λ = sigmoid(η), and the normalizer
    C(λ) = 2 artanh(1 − 2λ)/(1 − 2λ) becomes C = η / tanh(η/2) (since 1 − 2λ = −tanh(η/2))."""

    name = "continuous_bernoulli"

    def log_prob(self, out_LBP: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        return super().log_prob(out_LBP, x_BD) + self.log_normalizer(out_LBP).sum(-1)

    @staticmethod
    def _near_zero(eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where |η| < 1e-2 the closed forms below cancel catastrophically and a series is used: that
        mask, and η with those entries replaced by 1 so the closed form stays finite (and its gradient)."""
        small = eta.abs() < 1e-2
        return small, torch.where(small, torch.ones_like(eta), eta)

    @classmethod
    def log_normalizer(cls, eta: torch.Tensor) -> torch.Tensor:
        """log C = log|η| − log|tanh(η/2)|; near η = 0 its series log 2 + η²/12 (error below 1e-9)."""
        small, safe = cls._near_zero(eta)
        exact = torch.log(safe.abs()) - torch.log(torch.tanh(safe.abs() / 2))
        return torch.where(small, math.log(2.0) + eta.pow(2) / 12.0, exact)

    def mean(self, out_BP: torch.Tensor) -> torch.Tensor:
        # E[x] = λ/(2λ − 1) + 1/(2 artanh(1 − 2λ)) = sigmoid(η)/tanh(η/2) − 1/η; near η = 0, ½ + η/12.
        eta = out_BP
        small, safe = self._near_zero(eta)
        return torch.where(small, 0.5 + eta / 12.0, torch.sigmoid(safe) / torch.tanh(safe / 2) - 1.0 / safe)


class DiscretizedLogisticLikelihood(Likelihood):
    """8-bit pixels as 256 bins of a logistic (PixelCNN++, Salimans et al. 2017; IAF; NVAE): the decoder
    gives a mean μ and a log-scale per pixel on [−1, 1], where value k of 255 is y = 2k/255 − 1 and its bin
    is y ± 1/255 (the end bins reach ±∞). log p(x|z) is the log of a probability mass, so log p(x) of 8-bit
    data in bits per dimension is −log p(x) / (D ln 2) with no correction. Inputs are the reader's k/255."""

    name = "discretized_logistic"
    params_per_dim = 2
    HALF_BIN = 1.0 / 255.0

    def validate(self, x_BD: torch.Tensor) -> None:
        super().validate(x_BD)
        if x_BD.numel() and (x_BD.min() < 0 or x_BD.max() > 1):
            raise ValueError(f"a {self.name} decoder needs 8-bit values read as k/255 in [0, 1]")

    @staticmethod
    def _split(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_scale = out.chunk(2, dim=-1)
        return mean, log_scale.clamp_min(-7.0)  # a scale below e^-7 is far inside one bin: no gain, only overflow

    def log_prob(self, out_LBP: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        mean, log_scale = self._split(out_LBP)
        centered = (2.0 * x_BD - 1.0) - mean
        inv_scale = torch.exp(-log_scale)
        upper, lower = inv_scale * (centered + self.HALF_BIN), inv_scale * (centered - self.HALF_BIN)
        log_cdf_upper = upper - F.softplus(upper)  # log σ(upper): the lowest bin, from −∞
        log_survival_lower = -F.softplus(lower)  # log (1 − σ(lower)): the highest bin, to +∞
        mass = torch.sigmoid(upper) - torch.sigmoid(lower)
        # Where the mass underflows (a bin far in a tail), its density at the bin's centre times the width.
        middle = inv_scale * centered
        log_mass_tail = middle - log_scale - 2.0 * F.softplus(middle) + math.log(2.0 * self.HALF_BIN)
        log_mass = torch.where(mass > 1e-5, torch.log(mass.clamp_min(1e-12)), log_mass_tail)
        y = 2.0 * x_BD - 1.0
        per_pixel = torch.where(y < -0.999, log_cdf_upper, torch.where(y > 0.999, log_survival_lower, log_mass))
        return per_pixel.sum(-1)

    def mean(self, out_BP: torch.Tensor) -> torch.Tensor:
        return (self._split(out_BP)[0].clamp(-1.0, 1.0) + 1.0) / 2.0


class CountLikelihood(nn.Module, Likelihood):
    """A likelihood of counts x ∈ ℕ^D whose mean is the row's observed library size l = Σ_d x_d times the
    decoder's proportions ρ = softmax(η) (scVI's `use_observed_lib_size`: l is part of the observation, not
    modelled). The encoder reads log(1 + x), as scVI's does. An nn.Module: some hold per-feature parameters θ."""

    models_counts = True
    params_per_dim = 1

    def __init__(self, num_features: int):
        nn.Module.__init__(self)
        self.num_features = num_features

    def encoder_input(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x_BD)

    def validate(self, x_BD: torch.Tensor) -> None:
        super().validate(x_BD)
        if x_BD.numel() and (x_BD.min() < 0 or not torch.equal(x_BD, x_BD.round())):
            raise ValueError(f"a {self.name} decoder needs counts: non-negative integers")

    @staticmethod
    def log_library_size(x_BD: torch.Tensor) -> torch.Tensor:
        """log l, [B, 1]; a row without counts is given l = 1 (its counts are all zero whatever ρ is, and
        log 0 would make 0·log μ a NaN)."""
        return torch.log(x_BD.sum(-1, keepdim=True).clamp_min(1.0))

    def log_mean(self, out_LBP: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        """log μ = log l + log softmax(η), [L, B, D]."""
        return self.log_library_size(x_BD) + F.log_softmax(out_LBP[..., : self.num_features], dim=-1)

    def mean(self, out_BP: torch.Tensor) -> torch.Tensor:
        """The expected proportions ρ (scVI's normalized expression): the mean of x / l."""
        return F.softmax(out_BP[..., : self.num_features], dim=-1)


class PoissonLikelihood(CountLikelihood):
    """x_d ~ Poisson(μ_d): log p = Σ_d x_d log μ_d − μ_d − log x_d!  (Σ_d μ_d = l)."""

    name = "poisson"

    def log_prob(self, out_LBP: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        log_mean_LBD = self.log_mean(out_LBP, x_BD)
        return torch.linalg.vecdot(log_mean_LBD, x_BD) - log_mean_LBD.exp().sum(-1) - torch.lgamma(x_BD + 1).sum(-1)


class MultinomialLikelihood(CountLikelihood):
    """x ~ Multinomial(l, ρ) (Mult-VAE, Liang et al. 2018; NVDM, Miao et al. 2016):
    log p = log l! − Σ_d log x_d! + Σ_d x_d log ρ_d."""

    name = "multinomial"

    def log_prob(self, out_LBP: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        log_rho_LBD = F.log_softmax(out_LBP, dim=-1)
        total_B = x_BD.sum(-1)
        return torch.linalg.vecdot(log_rho_LBD, x_BD) + torch.lgamma(total_B + 1) - torch.lgamma(x_BD + 1).sum(-1)


class NegativeBinomialLikelihood(CountLikelihood):
    """x_d ~ NB(μ_d, θ_d), mean μ and inverse dispersion θ (variance μ + μ²/θ), θ a learned parameter per
    feature (scVI's `dispersion="gene"`):
    log p = log Γ(x + θ) − log Γ(θ) − log x! + θ log(θ / (θ + μ)) + x log(μ / (θ + μ))."""

    name = "negative_binomial"

    def __init__(self, num_features: int):
        super().__init__(num_features)
        # log θ, initialized at θ = 1 as scVI's px_r ~ N(0, 1) is on average.
        self.log_inverse_dispersion_D = nn.Parameter(torch.zeros(num_features))

    def _nb_terms(self, log_mean_LBD: torch.Tensor, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log NB(x; μ, θ) per feature [L, B, D], and log NB(0; μ, θ) = θ log(θ / (θ + μ)) [L, B, D]."""
        log_theta_D = self.log_inverse_dispersion_D
        theta_D = log_theta_D.exp()
        log_theta_plus_mean_LBD = torch.logaddexp(log_theta_D, log_mean_LBD)
        log_zero_LBD = theta_D * (log_theta_D - log_theta_plus_mean_LBD)
        # The terms without μ do not depend on z: once per row, not once per latent sample.
        normalizer_BD = torch.lgamma(x_BD + theta_D) - torch.lgamma(theta_D) - torch.lgamma(x_BD + 1)
        return log_zero_LBD + x_BD * (log_mean_LBD - log_theta_plus_mean_LBD) + normalizer_BD, log_zero_LBD

    def log_prob(self, out_LBP: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        return self._nb_terms(self.log_mean(out_LBP, x_BD), x_BD)[0].sum(-1)


class ZeroInflatedNegativeBinomialLikelihood(NegativeBinomialLikelihood):
    """x_d ~ π_d δ_0 + (1 − π_d) NB(μ_d, θ_d), the dropout probability π = sigmoid(decoder's second output per
    feature) (scVI's ZINB): log p = log(π + (1 − π) NB(0)) at x = 0, log(1 − π) + log NB(x) elsewhere."""

    name = "zinb"
    params_per_dim = 2

    def log_prob(self, out_LBP: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
        log_nb_LBD, log_nb_zero_LBD = self._nb_terms(self.log_mean(out_LBP, x_BD), x_BD)
        dropout_logits_LBD = out_LBP[..., self.num_features :]
        log_kept_LBD = -F.softplus(dropout_logits_LBD)  # log(1 − π)
        # With a the dropout logit, π = sigmoid(a): log(π + (1 − π) NB(0)) = log((e^a + NB(0)) / (1 + e^a))
        # = logaddexp(a, log NB(0)) − softplus(a), stable for any a.
        log_zero_LBD = torch.logaddexp(dropout_logits_LBD, log_nb_zero_LBD) - F.softplus(dropout_logits_LBD)
        return torch.where(x_BD == 0, log_zero_LBD, log_kept_LBD + log_nb_LBD).sum(-1)


COUNT_LIKELIHOODS = {
    "poisson": PoissonLikelihood,
    "negative_binomial": NegativeBinomialLikelihood,
    "zinb": ZeroInflatedNegativeBinomialLikelihood,
    "multinomial": MultinomialLikelihood,
}


LIKELIHOODS = {
    "bernoulli": BernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "continuous_bernoulli": ContinuousBernoulliLikelihood,
    "discretized_logistic": DiscretizedLogisticLikelihood,
    **COUNT_LIKELIHOODS,
}
names.require_registry("likelihood", names.LIKELIHOODS, LIKELIHOODS)


def likelihood_from_name(name: str, squash_mean: bool = False, input_dim: int = 0) -> Likelihood:
    """The likelihood `name`; `input_dim` sizes a count likelihood's per-feature parameters (NB's dispersion)."""
    if name not in LIKELIHOODS:
        raise ValueError(f"model.likelihood={name!r} is not one of: {', '.join(LIKELIHOODS)}")
    if name == "gaussian":
        return GaussianLikelihood(squash_mean=squash_mean)
    if name in COUNT_LIKELIHOODS:
        return COUNT_LIKELIHOODS[name](input_dim)
    return LIKELIHOODS[name]()
