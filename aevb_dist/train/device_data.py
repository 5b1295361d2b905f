"""`data.cache_on_device=true`: the whole training set in the worker's device memory, read once.

Rows are kept as stored (uint8 for byte images: 47 MB for MNIST) and every batch is gathered and
binarized on the device with the reader's rule, ported to 32-bit integer arithmetic in torch: the
same hash of (seed, epoch, example index, pixel), the same integer thresholds, so a batch holds the
same examples, in the same order, with the same bits as `EpochStream` yields on the host (tested
bit for bit). The epoch's order comes from `EpochStream.row_positions`, computed from the footers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from aevb_dist.data.binarization import BYTE_THRESHOLDS, binarization_key
from aevb_dist.data.epoch_stream import EpochStream
from aevb_dist.data.reader import ParquetDataset

_MASK32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, constant: int) -> torch.Tensor:
    """(h · constant) mod 2³² for h in [0, 2³²) held in int64, without signed overflow: split h in
    16-bit halves, so no partial product reaches 2⁶³."""
    low, high = h & 0xFFFF, h >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (data/binarization.py `_fmix32`) on int64 tensors holding uint32."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def example_hashes(index_N: torch.Tensor, key: int) -> torch.Tensor:
    """Per-example words of `binarization._hash_inputs`: fmix32(fmix32(lo ^ key_lo) ^ hi ^ key_hi)."""
    low, high = index_N & _MASK32, (index_N >> 32) & _MASK32
    return fmix32(fmix32(low ^ (key & _MASK32)) ^ high ^ ((key >> 32) & _MASK32))


class DeviceBinarization:
    """The reader's binarization rule on the device (data/binarization.py `binarize_bytes` and `binarize`):
    the bits of rows given each row's per-example hash word (`example_hashes`). One kernel sequence, used by
    the device cache and by the streamed windows (train/device_stream.py)."""

    def __init__(self, dim: int, device: torch.device, is_bytes: bool):
        self.is_bytes = is_bytes
        self.pixel_words_D = (torch.arange(dim, dtype=torch.int64, device=device) * 0x9E3779B9) & _MASK32
        self.thresholds = torch.from_numpy(BYTE_THRESHOLDS.astype(np.int64)).to(device)

    def bits(self, rows_BD: torch.Tensor, words_B: torch.Tensor) -> torch.Tensor:
        """x ~ Bernoulli(intensity) as bool [B, D]: uint8 rows v compared as u < v/255 in integers, others as
        floats in [0, 1]."""
        bits24_BD = fmix32((words_B[:, None] + self.pixel_words_D[None, :]) & _MASK32) >> 8
        if self.is_bytes:
            return bits24_BD < self.thresholds[rows_BD.long()]
        return (bits24_BD.float() * 2.0**-24) < rows_BD


@dataclass
class EpochPlan:
    """One rank's epoch: row positions [num_batches, B] (padded with row 0) and weights [num_batches, B]
    (1 for a real example, 0 for padding), on the device; `counts` [num_batches] on the host."""

    positions: torch.Tensor
    weights: torch.Tensor
    counts: np.ndarray


class DeviceData:
    def __init__(self, dataset: ParquetDataset, device: torch.device, binarization: str, seed: int):
        raws = [dataset.read_raw(unit) for unit in dataset.units]  # the stored order, checked as read
        rows = np.concatenate([r.x for r in raws])
        # Byte images to binarize stay bytes (compared with integer thresholds, as `binarize_bytes` does);
        # anything else is scaled to [0, 1] once, by the reader's own function.
        self.is_bytes = binarization != "none" and dataset.is_bytes() and rows.dtype == np.uint8
        self.rows_ND = torch.from_numpy(rows if self.is_bytes else dataset.to_unit_interval(rows)).to(device)
        self.index_N = torch.from_numpy(np.concatenate([r.index for r in raws])).to(device)
        self.dataset, self.device, self.binarization, self.seed = dataset, device, binarization, seed
        self.rule = DeviceBinarization(rows.shape[1], device, self.is_bytes)

    def plan(self, stream: EpochStream) -> EpochPlan:
        """The batches `stream` would yield (all of them; the caller starts at its data position)."""
        order = stream.row_positions()
        size, num_batches = stream.batch_size, stream.num_batches
        padded = np.zeros(num_batches * size, np.int64)
        padded[: len(order)] = order
        weights = np.zeros(num_batches * size, np.float32)
        weights[: len(order)] = 1.0
        counts = np.clip(len(order) - np.arange(num_batches) * size, 0, size)
        return EpochPlan(
            torch.from_numpy(padded.reshape(num_batches, size)).to(self.device),
            torch.from_numpy(weights.reshape(num_batches, size)).to(self.device),
            counts,
        )

    def epoch_words(self, epoch: int) -> torch.Tensor:
        """Per-example hash words [N] of this epoch's binarization key (zeros when not binarizing)."""
        if self.binarization == "none":
            return torch.zeros_like(self.index_N)
        return example_hashes(self.index_N, binarization_key(self.binarization, self.seed, epoch))

    def batch(self, positions_B: torch.Tensor, words_N: torch.Tensor) -> torch.Tensor:
        """The model's input [B, D] float32 for rows `positions_B`: binarized, or intensities in [0, 1]."""
        return self.inputs(positions_B, words_N).float()

    def inputs(self, positions_B: torch.Tensor, words_N: torch.Tensor) -> torch.Tensor:
        """`batch` before the cast: bits as bool when binarizing (1 byte a pixel), else float32 rows."""
        rows_BD = self.rows_ND.index_select(0, positions_B)
        if self.binarization == "none":
            return rows_BD
        return self.rule.bits(rows_BD, words_N.index_select(0, positions_B))

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.float32 if self.binarization == "none" else torch.bool


class FusedInputs:
    """`DeviceData.inputs` compiled by torch.compile into one kernel: the same integer arithmetic, hence
    the same bits, with one read of the rows and one write of the bits, where eager torch makes ~28
    int64 passes over [rows, D] (on an H100 at M=1000, ~130 µs of a 673 µs step: docs/gpus.md).
    Compiled for dynamic shapes (chunks differ at an epoch's end). If compilation fails (no Triton, no C++
    compiler), it warns once and computes eagerly."""

    def __init__(self, data: DeviceData):
        self.data = data
        self.compiled = torch.compile(data.inputs, dynamic=True)

    def __call__(self, positions_B: torch.Tensor, words_N: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(positions_B, words_N)
            except Exception as err:  # the eager function is the same rule: only speed is lost
                warnings.warn(
                    f"data.cache_on_device: compiling the binarization failed, computing it eagerly "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})",
                    stacklevel=2,
                )
                self.compiled = None
        return self.data.inputs(positions_B, words_N)
