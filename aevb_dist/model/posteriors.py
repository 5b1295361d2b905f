"""Families for the recognition model q_φ(z|x), each reparameterized by one of the paper's routes.

Section 2.4 names three ways to write z ~ q_φ(z|x) as z = g_φ(ε, x) with parameter-free noise ε:
(1) a tractable inverse CDF, z = F⁻¹(u), u ~ U(0, 1); (2) a location-scale family,
z = μ + s·ε with ε from the standard member; (3) a composition of such transforms. Each family
below says which route it takes (`route`) and samples by it.

Every family is factorized over the Z latents and has two encoder outputs per latent, `a` and `b`
(for the Gaussian: μ and log σ², as in Appendix C.2). Each also has a closed-form KL to the
prior N(0, I), by the identity

    KL(q || N(0, 1)) = −H[q] + ½ log 2π + ½ E_q[z²]        (per latent)

so estimator B (eq. 7) is exact, not approximate, for all of them; the Gaussian uses
Appendix B's formula, which is this identity written out. Pure torch.

Shapes: B batch, Z latent dimension, L latent samples.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from aevb_dist import names
from aevb_dist.model.distributions import LOG_2PI, kl_diag_gaussian_to_standard_normal, log_normal_diag
from aevb_dist.model.noise import standard_normal, standard_uniform

EULER_GAMMA = 0.5772156649015329


def _uniform(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """u ~ U(0, 1), kept away from 0 and 1 so that logs of u and 1 − u stay finite."""
    u = standard_uniform(shape, like, generator)
    finfo = torch.finfo(like.dtype)
    return u.clamp(finfo.tiny, 1.0 - finfo.eps)


class PosteriorFamily:
    """A factorized q_φ(z|x) given by two [B, Z] parameter tensors (a, b)."""

    name: str
    route: str  # "location-scale", "inverse CDF" or "composition" (paper, Section 2.4)
    support: str  # "real", "positive" or "unit interval"

    def sample(
        self, a_BZ: torch.Tensor, b_BZ: torch.Tensor, num_samples: int, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """z = g_φ(ε, x), differentiable in (a, b). [L, B, Z]."""
        raise NotImplementedError

    def log_prob(self, z_LBZ: torch.Tensor, a_BZ: torch.Tensor, b_BZ: torch.Tensor) -> torch.Tensor:
        """log q_φ(z|x), summed over latents, [L, B]."""
        raise NotImplementedError

    def entropy(self, a_BZ: torch.Tensor, b_BZ: torch.Tensor) -> torch.Tensor:
        """H[q] per latent, [B, Z]."""
        raise NotImplementedError

    def moments(self, a_BZ: torch.Tensor, b_BZ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E_q[z] and E_q[z²] per latent, each [B, Z]."""
        raise NotImplementedError

    def kl_per_latent(self, a_BZ: torch.Tensor, b_BZ: torch.Tensor) -> torch.Tensor:
        """KL(q_φ(z_u|x) || N(0, 1)) of each latent u in closed form, [B, Z]: the terms `kl_to_standard_normal`
        sums (q factorizes over the latents)."""
        _, second_BZ = self.moments(a_BZ, b_BZ)
        return -self.entropy(a_BZ, b_BZ) + 0.5 * LOG_2PI + 0.5 * second_BZ

    def kl_to_standard_normal(self, a_BZ: torch.Tensor, b_BZ: torch.Tensor) -> torch.Tensor:
        """KL(q_φ(z|x) || N(0, I)) in closed form, [B] (the identity in this module's docstring)."""
        _, second_BZ = self.moments(a_BZ, b_BZ)
        return (-self.entropy(a_BZ, b_BZ) + 0.5 * LOG_2PI + 0.5 * second_BZ).sum(-1)

    def mean_and_std(self, a_BZ: torch.Tensor, b_BZ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q per latent: what `aevb-dist encode` writes."""
        first_BZ, second_BZ = self.moments(a_BZ, b_BZ)
        return first_BZ, (second_BZ - first_BZ.pow(2)).clamp_min(0.0).sqrt()


class _LocationScale(PosteriorFamily):
    """z = μ + s·ε, ε from the family's standard member (route 2); a = μ, b = log s."""

    route = "location-scale"
    support = "real"
    log_base_scale_entropy: float  # H of the standard member
    base_variance: float  # Var of the standard member

    def standard_noise(self, shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        raise NotImplementedError

    def standard_log_prob(self, eps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scale(self, b_BZ: torch.Tensor) -> torch.Tensor:
        return b_BZ.exp()

    def sample(self, a_BZ, b_BZ, num_samples, generator=None):
        eps_LBZ = self.standard_noise((num_samples, *a_BZ.shape), a_BZ, generator)
        return a_BZ + self.scale(b_BZ) * eps_LBZ

    def log_prob(self, z_LBZ, a_BZ, b_BZ):
        log_s = self.log_scale(b_BZ)
        return (self.standard_log_prob((z_LBZ - a_BZ) * torch.exp(-log_s)) - log_s).sum(-1)

    def log_scale(self, b_BZ: torch.Tensor) -> torch.Tensor:
        return b_BZ

    def entropy(self, a_BZ, b_BZ):
        return self.log_base_scale_entropy + self.log_scale(b_BZ)

    def moments(self, a_BZ, b_BZ):
        return a_BZ, a_BZ.pow(2) + self.base_variance * self.scale(b_BZ).pow(2)


class Gaussian(_LocationScale):
    """N(μ, σ²), the paper's choice (eq. 10); b = log σ² as in Appendix C.2."""

    name = "gaussian"
    log_base_scale_entropy = 0.5 * (1.0 + LOG_2PI)
    base_variance = 1.0

    def standard_noise(self, shape, like, generator):
        return standard_normal(shape, like, generator)

    def scale(self, b_BZ):
        return torch.exp(0.5 * b_BZ)

    def log_scale(self, b_BZ):
        return 0.5 * b_BZ

    def log_prob(self, z_LBZ, a_BZ, b_BZ):
        return log_normal_diag(z_LBZ, a_BZ, b_BZ)

    def kl_to_standard_normal(self, a_BZ, b_BZ):
        return kl_diag_gaussian_to_standard_normal(a_BZ, b_BZ)  # Appendix B

    def kl_per_latent(self, a_BZ, b_BZ):
        return -0.5 * (1.0 + b_BZ - a_BZ.pow(2) - b_BZ.exp())  # Appendix B, term by term


class GaussianLogStd(Gaussian):
    """The same N(μ, σ²), its scale output read as b = log σ (σ = exp(b), Burda et al.'s code) rather than log σ²:
    one family, its σ learned on a log scale twice as steep, and initialized twice as wide."""

    name = "gaussian_log_std"

    def scale(self, b_BZ):
        return torch.exp(b_BZ)

    def log_scale(self, b_BZ):
        return b_BZ

    def log_prob(self, z_LBZ, a_BZ, b_BZ):
        return super().log_prob(z_LBZ, a_BZ, 2.0 * b_BZ)

    def kl_to_standard_normal(self, a_BZ, b_BZ):
        return super().kl_to_standard_normal(a_BZ, 2.0 * b_BZ)

    def kl_per_latent(self, a_BZ, b_BZ):
        return super().kl_per_latent(a_BZ, 2.0 * b_BZ)


class Laplace(_LocationScale):
    """Laplace(μ, s): density exp(−|z − μ|/s) / 2s; ε = −sign(v) log(1 − 2|v|), v ~ U(−½, ½)."""

    name = "laplace"
    log_base_scale_entropy = 1.0 + math.log(2.0)
    base_variance = 2.0

    def standard_noise(self, shape, like, generator):
        v = _uniform(shape, like, generator) - 0.5
        return -torch.sign(v) * torch.log1p(-2.0 * v.abs())

    def standard_log_prob(self, eps):
        return -eps.abs() - math.log(2.0)


class Logistic(_LocationScale):
    """Logistic(μ, s): ε = log u − log(1 − u), the standard logistic's inverse CDF at u ~ U(0, 1)."""

    name = "logistic"
    log_base_scale_entropy = 2.0
    base_variance = math.pi**2 / 3.0

    def standard_noise(self, shape, like, generator):
        u = _uniform(shape, like, generator)
        return torch.log(u) - torch.log1p(-u)

    def standard_log_prob(self, eps):
        return -eps - 2.0 * torch.nn.functional.softplus(-eps)


class Kumaraswamy(PosteriorFamily):
    """Kumaraswamy(α, β) on (0, 1), CDF 1 − (1 − z^α)^β; sampled by its inverse CDF (route 1):
    z = (1 − u^{1/β})^{1/α}, u ~ U(0, 1). a = log α, b = log β."""

    name = "kumaraswamy"
    route = "inverse CDF"
    support = "unit interval"

    def sample(self, a_BZ, b_BZ, num_samples, generator=None):
        u_LBZ = _uniform((num_samples, *a_BZ.shape), a_BZ, generator)
        # log z = (1/α) log(1 − exp(log u / β)), in log space for precision near 0 and 1.
        log_z = torch.log(-torch.expm1(torch.log(u_LBZ) * torch.exp(-b_BZ))) * torch.exp(-a_BZ)
        finfo = torch.finfo(a_BZ.dtype)
        return log_z.exp().clamp(finfo.tiny, 1.0 - finfo.eps)

    def log_prob(self, z_LBZ, a_BZ, b_BZ):
        alpha, beta = a_BZ.exp(), b_BZ.exp()
        log_z = torch.log(z_LBZ)
        # log α + log β + (α − 1) log z + (β − 1) log(1 − z^α)
        return (a_BZ + b_BZ + (alpha - 1) * log_z + (beta - 1) * torch.log(-torch.expm1(alpha * log_z))).sum(-1)

    def entropy(self, a_BZ, b_BZ):
        # H = (1 − 1/β) + (1 − 1/α) H_β − log(αβ), H_β = ψ(β + 1) + γ the harmonic number.
        alpha, beta = a_BZ.exp(), b_BZ.exp()
        harmonic = torch.digamma(beta + 1.0) + EULER_GAMMA
        return (1.0 - 1.0 / beta) + (1.0 - 1.0 / alpha) * harmonic - (a_BZ + b_BZ)

    def _raw_moment(self, n: int, a_BZ, b_BZ):
        # E[z^n] = β B(1 + n/α, β)
        alpha, beta = a_BZ.exp(), b_BZ.exp()
        x = 1.0 + n / alpha
        return torch.exp(b_BZ + torch.lgamma(x) + torch.lgamma(beta) - torch.lgamma(x + beta))

    def moments(self, a_BZ, b_BZ):
        return self._raw_moment(1, a_BZ, b_BZ), self._raw_moment(2, a_BZ, b_BZ)


class LogNormal(PosteriorFamily):
    """log z ~ N(μ, σ²): a location-scale draw composed with exp (route 3). a = μ, b = log σ²."""

    name = "lognormal"
    route = "composition"
    support = "positive"

    def sample(self, a_BZ, b_BZ, num_samples, generator=None):
        return torch.exp(Gaussian().sample(a_BZ, b_BZ, num_samples, generator))

    def log_prob(self, z_LBZ, a_BZ, b_BZ):
        log_z = torch.log(z_LBZ)
        return log_normal_diag(log_z, a_BZ, b_BZ) - log_z.sum(-1)  # change of variables: |dz/dlog z| = z

    def entropy(self, a_BZ, b_BZ):
        return a_BZ + 0.5 * (1.0 + LOG_2PI + b_BZ)

    def moments(self, a_BZ, b_BZ):
        var = b_BZ.exp()
        return torch.exp(a_BZ + 0.5 * var), torch.exp(2.0 * a_BZ + 2.0 * var)


POSTERIORS: dict[str, type[PosteriorFamily]] = {
    cls.name: cls for cls in (Gaussian, GaussianLogStd, Laplace, Logistic, Kumaraswamy, LogNormal)
}
names.require_registry("posterior", names.POSTERIORS, POSTERIORS)


def posterior_from_name(name: str) -> PosteriorFamily:
    if name not in POSTERIORS:
        raise ValueError(f"model.posterior={name!r} is not one of: {', '.join(POSTERIORS)}")
    return POSTERIORS[name]()
