"""Where the reparameterization's noise ε comes from (paper, Section 2.4: z = g_φ(ε, x), ε ~ p(ε)).

A `torch.Generator` draws the whole [L, B, Z] at once. `SegmentedNoise` draws a batch made of
segments — one per data partition, in `train.global_batch_size` runs — each from its own generator,
so the noise of a partition's examples is the same whichever worker computes them and whatever other
partitions share its batch. Pure torch.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch


class SegmentedNoise:
    """Draws [L, B, ...] noise whose rows (dim 1) come in segments of `sizes`, segment s from `generators[s]`."""

    def __init__(self, generators: Sequence[torch.Generator], sizes: Sequence[int]):
        if len(generators) != len(sizes):
            raise ValueError(f"{len(generators)} generators for {len(sizes)} segments")
        self.generators, self.sizes = list(generators), [int(n) for n in sizes]

    def draw(self, sampler, shape, like: torch.Tensor) -> torch.Tensor:
        if len(shape) < 2 or shape[1] != sum(self.sizes):
            raise ValueError(f"noise of shape {tuple(shape)} for segments of {self.sizes} rows")
        parts = [
            sampler((shape[0], n, *shape[2:]), generator=g, dtype=like.dtype, device=like.device)
            for g, n in zip(self.generators, self.sizes)
        ]
        return torch.cat(parts, dim=1)


NoiseSource = Union[torch.Generator, SegmentedNoise, None]


def standard_normal(shape, like: torch.Tensor, source: NoiseSource) -> torch.Tensor:
    """ε ~ N(0, I) of `shape`, in `like`'s dtype and device."""
    if isinstance(source, SegmentedNoise):
        return source.draw(torch.randn, shape, like)
    return torch.randn(shape, generator=source, dtype=like.dtype, device=like.device)


def standard_uniform(shape, like: torch.Tensor, source: NoiseSource) -> torch.Tensor:
    """u ~ U(0, 1) of `shape`, in `like`'s dtype and device."""
    if isinstance(source, SegmentedNoise):
        return source.draw(torch.rand, shape, like)
    return torch.rand(shape, generator=source, dtype=like.dtype, device=like.device)
