"""Binarization of [0, 1] intensities for Bernoulli models: x ~ Bernoulli(intensity), drawn from a
hash of (seed, epoch, example index, pixel), so a draw depends on the example, never on which
worker reads it or when (a resumed or resized run draws the same bits).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from aevb_dist import names, seeds
from aevb_dist.data.schema import Batch


def eval_binarization(likelihood: str, train_binarization: str) -> str:
    """Bernoulli models are evaluated on one fixed (seeded) binarization; others on intensities."""
    return "none" if likelihood != "bernoulli" or train_binarization == "none" else "static"


def train_binarization(likelihood: str, binarization: str) -> str:
    """Only Bernoulli models see binarized data in training; other likelihoods read intensities."""
    return binarization if likelihood == "bernoulli" else "none"


def _fmix32(h: np.ndarray, scratch: Optional[np.ndarray] = None) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, in place: a bijection that mixes every input bit into every
    output bit. `scratch` (h's shape and dtype) saves allocating a temporary per shift."""
    tmp = np.empty_like(h) if scratch is None else scratch
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
        np.right_shift(h, np.uint32(shift), out=tmp)
        h ^= tmp
        if mult is not None:
            h *= np.uint32(mult)
    return h


def _hash_inputs(index_B: np.ndarray, dim: int, key: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-example [B] and per-pixel [dim] words; their sum, finalized, is the pixel's hash."""
    lo = (index_B & 0xFFFFFFFF).astype(np.uint32)
    hi = (index_B >> 32).astype(np.uint32)
    per_example = _fmix32(_fmix32(lo ^ np.uint32(key & 0xFFFFFFFF)) ^ hi ^ np.uint32((key >> 32) & 0xFFFFFFFF))
    return per_example, np.arange(dim, dtype=np.uint32) * np.uint32(0x9E3779B9)


def uniform_bits24(index_B: np.ndarray, dim: int, key: int) -> np.ndarray:
    """Uniform integers in [0, 2²⁴) [B, dim] (uint32), a pure function of (key, example index, pixel)."""
    with np.errstate(over="ignore"):
        per_example, per_pixel = _hash_inputs(index_B, dim, key)
        z = _fmix32(per_example[:, None] + per_pixel[None, :])
        z >>= np.uint32(8)
    return z


def uniform_hash(index_B: np.ndarray, dim: int, key: int) -> np.ndarray:
    """Uniform [0, 1) numbers [B, dim], a pure function of (key, example index, pixel)."""
    return uniform_bits24(index_B, dim, key).astype(np.float32) * np.float32(2.0**-24)


def binarization_key(mode: str, seed: int, epoch: int) -> int:
    """The hash key of a draw: `dynamic` has one per epoch, `static` one for all (the device cache uses it too)."""
    if mode not in ("dynamic", "static"):
        raise ValueError(f"data.binarization={mode!r} is not one of: {', '.join(names.BINARIZATIONS)}")
    return seeds.binarization_key(seed, epoch, per_epoch=mode == "dynamic")


def binarize(batch: Batch, mode: str, *, seed: int, epoch: int) -> Batch:
    """x ~ Bernoulli(intensity): `dynamic` draws anew each epoch, `static` once; seeded per example and pixel."""
    if mode == "none" or len(batch) == 0:
        return batch
    u = uniform_hash(batch.index, batch.x.shape[1], binarization_key(mode, seed, epoch))
    return dataclasses.replace(batch, x=(u < batch.x).astype(np.float32))


# u < v/255 ⟺ ⌊2²⁴u⌋ < ⌈v·2²⁴/255⌉ for integers ⌊2²⁴u⌋: one threshold per byte value.
BYTE_THRESHOLDS = np.array([-(-(v << 24) // 255) for v in range(256)], dtype=np.uint32)
_ROWS_PER_CHUNK = 64  # 64 × 784 uint32 = 200 KB: each pass over a chunk stays in cache


def binarize_bytes(batch: Batch, mode: str, *, seed: int, epoch: int) -> Batch:
    """`binarize` for uint8 intensities v/255, exactly (u < v/255 compared in integers), without a
    float conversion of the pixels. Same bits as `uniform_bits24`, computed in cache-sized chunks
    with in-place passes: the reader shares the cores with the training step."""
    n, dim = batch.x.shape
    out = np.empty((n, dim), np.float32)
    if n == 0:
        return dataclasses.replace(batch, x=out)
    with np.errstate(over="ignore"):
        per_example, per_pixel = _hash_inputs(batch.index, dim, binarization_key(mode, seed, epoch))
        h = np.empty((min(_ROWS_PER_CHUNK, n), dim), np.uint32)
        tmp = np.empty_like(h)
        for start in range(0, n, _ROWS_PER_CHUNK):
            stop = min(start + _ROWS_PER_CHUNK, n)
            hh, tt = h[: stop - start], tmp[: stop - start]
            np.add(per_example[start:stop, None], per_pixel[None, :], out=hh)
            _fmix32(hh, tt)
            # u < ⌈v·2²⁴/255⌉ ⟺ 255u < v·2²⁴ ⟺ ⌊255u / 2²⁴⌋ < v for the integer u = h >> 8 < 2²⁴ (255u < 2³²):
            # two cheap passes and a byte comparison instead of a gather of BYTE_THRESHOLDS per pixel.
            hh >>= np.uint32(8)
            hh *= np.uint32(255)
            hh >>= np.uint32(24)
            np.less(hh, batch.x[start:stop], out=out[start:stop])
    return dataclasses.replace(batch, x=out)
