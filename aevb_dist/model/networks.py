"""The encoder and decoder networks: the paper's multilayer perceptrons (Appendix C), a convolutional pair
for images, and a user's own pair by import path. Pure torch."""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from aevb_dist import names

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid, "elu": nn.ELU}
names.require_registry("activation", names.ACTIVATIONS, ACTIVATIONS)


def mlp(in_features: int, hidden_sizes: list[int], out_features: int, activation: str) -> nn.Sequential:
    """in → [Linear → activation] per hidden size → Linear → out. No hidden sizes: one affine map."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def autocast_networks(vae, device: torch.device) -> None:
    """bf16 autocast for the encoder's and decoder's matrix products only: their outputs return to float32,
    so the noise ε, the likelihood, the KL and every sum stay float32."""
    for network in (vae.encoder, vae.decoder):

        def forward(x, _inner=network.forward):
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):  # CUDA-graph safe
                out = _inner(x)
            return out.float()

        network.forward = forward


def init_glorot_uniform(module: nn.Module) -> None:
    """Every Linear layer's weights from U(±√(6 / (fan_in + fan_out))) (Glorot & Bengio, 2010), biases 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


def init_paper(module: nn.Module, std: float = 0.01) -> None:
    """The paper initialises parameters from N(0, 0.01²) (Section 5)."""
    for p in module.parameters():
        nn.init.normal_(p, mean=0.0, std=std)


# -- networks for shaped data: `model.architecture` = conv, or a user's "package.module:factory" ----------
#
# The contract every shaped encoder/decoder pair meets (the built-in conv one and a user's):
#   encoder: x [B, *input_shape] → [B, 2·Z], the two parameters per latent of q_φ(z|x) (posteriors.py);
#   decoder: z [N, Z] → [N, P, *input_shape], P outputs per pixel of p_θ(x|z): 1 for bernoulli and
#            continuous_bernoulli (logits), 2 for gaussian (mean, log-variance).
# `ShapedNetwork` adapts them to the VAE's flat rows, so estimators, evaluation and checkpoints are
# the same for every architecture.


def image_shape(shape: list[int]) -> tuple[int, int, int]:
    """[H, W] (one channel) or [C, H, W]: what a conv network reads."""
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    raise ValueError(f"model.architecture=conv needs images of shape [H, W] or [C, H, W], got {list(shape)}")


class ConvEncoder(nn.Module):
    """Stride-2 4×4 convolutions (each halving H and W), then one affine map to 2·Z."""

    def __init__(self, shape: list[int], channels: list[int], latent_dim: int, activation: str):
        super().__init__()
        c, h, w = self.shape = image_shape(shape)
        self.input_shape = list(shape)  # as the data has it: [H, W] or [C, H, W]
        layers: list[nn.Module] = []
        self.sizes = [(h, w)]
        for width in channels:
            layers += [nn.Conv2d(c, width, 4, stride=2, padding=1), ACTIVATIONS[activation]()]
            c, h, w = width, h // 2, w // 2
            if h < 1 or w < 1:
                raise ValueError(
                    f"model.conv_channels={channels}: {len(channels)} halvings of an image of shape "
                    f"{list(shape)} leave nothing; use fewer layers"
                )
            self.sizes.append((h, w))
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(c * h * w, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x.reshape(x.shape[0], *self.shape)).flatten(1))


class ConvDecoder(nn.Module):
    """The encoder mirrored: an affine map from z, then stride-2 4×4 transposed convolutions back to the
    encoder's sizes (odd sizes through output_padding), the last one giving P maps per channel."""

    def __init__(
        self, encoder: ConvEncoder, channels: list[int], latent_dim: int, params_per_dim: int, activation: str
    ):
        super().__init__()
        c, _, _ = encoder.shape
        self.params_per_dim, self.out_shape = params_per_dim, encoder.input_shape
        sizes = encoder.sizes
        self.start = (channels[-1], *sizes[-1])
        self.inp = nn.Linear(latent_dim, channels[-1] * sizes[-1][0] * sizes[-1][1])
        widths = list(reversed(channels[:-1])) + [params_per_dim * c]
        layers: list[nn.Module] = [ACTIVATIONS[activation]()]
        width = channels[-1]
        for i, out in enumerate(widths):
            (h, w), (th, tw) = sizes[-1 - i], sizes[-2 - i]
            layers.append(
                nn.ConvTranspose2d(width, out, 4, stride=2, padding=1, output_padding=(th - 2 * h, tw - 2 * w))
            )
            if i < len(widths) - 1:
                layers.append(ACTIVATIONS[activation]())
            width = out
        self.features = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        maps = self.features(self.inp(z).reshape(z.shape[0], *self.start))  # [N, P·C, H, W]
        return maps.reshape(z.shape[0], self.params_per_dim, *self.out_shape)


def conv_networks(
    shape: list[int], latent_dim: int, params_per_dim: int, channels: list[int], activation: str
) -> tuple[nn.Module, nn.Module]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if not channels:
        raise ValueError("model.conv_channels is empty; give at least one layer's width, e.g. [32, 64]")
    encoder = ConvEncoder(shape, channels, latent_dim, activation)
    return encoder, ConvDecoder(encoder, channels, latent_dim, params_per_dim, activation)


def user_factory(path: str) -> Callable:
    """The function named by "package.module:function", imported; one line when it is not there."""
    module_name, _, function = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ValueError(
            f"model.architecture={path!r}: cannot import {module_name!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ValueError(f"model.architecture={path!r}: {module_name} has no function {function!r}")
    return factory


class ShapedNetwork(nn.Module):
    """A shaped encoder or decoder (the contract above) on the VAE's flat rows: x [B, D] in, or z [..., Z] in
    and [..., P·D] out (parameter-major, as the likelihoods split it)."""

    def __init__(self, network: nn.Module, shape: list[int], role: str):
        super().__init__()
        self.network, self.shape, self.role = network, list(shape), role

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.role == "encoder":
            return self.network(t.reshape(t.shape[0], *self.shape))
        lead = t.shape[:-1]
        out = self.network(t.reshape(-1, t.shape[-1]))
        return out.reshape(*lead, -1)


def check_contract(
    encoder: nn.Module, decoder: nn.Module, shape: list[int], latent_dim: int, params_per_dim: int, where: str
) -> None:
    """A dry run on two examples: the shapes the contract asks for, or one line naming what came back."""
    with torch.no_grad():
        got = tuple(encoder(torch.zeros(2, *shape)).shape)
        if got != (2, 2 * latent_dim):
            raise ValueError(
                f"{where}: the encoder maps [2, {', '.join(map(str, shape))}] to {list(got)}; "
                f"it must give [2, {2 * latent_dim}] (2 parameters per latent, model.latent_dim={latent_dim})"
            )
        got = tuple(decoder(torch.zeros(2, latent_dim)).shape)
        want = (2, params_per_dim, *shape)
        if got != want:
            raise ValueError(
                f"{where}: the decoder maps [2, {latent_dim}] to {list(got)}; it must give {list(want)} "
                f"({params_per_dim} output(s) per pixel for this likelihood)"
            )
