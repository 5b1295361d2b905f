"""Multilayer perceptrons for the encoder and decoder (paper, Appendix C). Pure torch."""

from __future__ import annotations

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


def init_paper(module: nn.Module, std: float = 0.01) -> None:
    """The paper initialises parameters from N(0, 0.01²) (Section 5)."""
    for p in module.parameters():
        nn.init.normal_(p, mean=0.0, std=std)
