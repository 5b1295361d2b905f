"""Streamed data on the device (`train.use_gpu=true`, `data.cache_on_device=false`): datasets larger than
device memory, read from Parquet every epoch without the host binarizing them.

Each shuffle window of the streaming reader (data/reader.py `EpochStream`) is decoded on the host as stored
(uint8 for byte images: a quarter of float32's bytes) by a pool of `data.decode_threads` threads (zstd and
page checksums release the GIL), put in pinned memory and copied to the device on a side stream, while the
previous window trains. On the device the window is put in the reader's order (its seeded permutation,
one gather), cut into batches, and each batch is binarized with the device cache's kernel
(train/device_data.py `DeviceBinarization`): the same examples, in the same order, with the same bits as
iterating the `EpochStream` yields on the host (tested bit for bit). On a CPU the same code runs without
pinned memory or a side stream (what the tests check).
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from aevb_dist.data.batching import batches_of
from aevb_dist.data.binarization import binarization_key
from aevb_dist.data.epoch_stream import EpochStream
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.train.device_data import DeviceBinarization, example_hashes


def default_decode_threads(window_row_groups: int) -> int:
    """One decoding thread per row group of a window, up to the cores this process may use: a window is
    decoded in about one row group's time where the cores allow it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(window_row_groups, cores))


def streamed_to(
    device: torch.device, dataset: ParquetDataset, data_cfg, binarization: str, seed: int
) -> Optional["DeviceWindows"]:
    """The windows of a run on a GPU (without the device cache: the caller's to check), as the config's data
    section says; None on a CPU, whose reader binarizes in its own process anyway."""
    if device.type != "cuda":
        return None
    threads = data_cfg.decode_threads or default_decode_threads(data_cfg.shuffle_window_row_groups)
    return DeviceWindows(dataset, device, binarization, seed, threads)


@dataclass
class _Window:
    rows_WD: torch.Tensor  # on the device, in the reader's order: uint8 as stored, or float32 in [0, 1]
    index_W: np.ndarray  # dataset indices, same order (host: for messages)
    ready: Optional[torch.cuda.Event]  # the side stream's copy is done (None on a CPU)
    pinned: Optional[torch.Tensor]  # kept alive until the copy is done


@dataclass(frozen=True)
class _DeviceRows:
    """Rows on the device with their dataset indices on the host (data/batching.py's `Rows`)."""

    rows_BD: torch.Tensor
    index_B: np.ndarray

    def __len__(self) -> int:
        return int(self.index_B.shape[0])

    def rows(self, start: int, stop: int) -> "_DeviceRows":
        return _DeviceRows(self.rows_BD[start:stop], self.index_B[start:stop])

    def then(self, other: "_DeviceRows") -> "_DeviceRows":
        return _DeviceRows(torch.cat([self.rows_BD, other.rows_BD]), np.concatenate([self.index_B, other.index_B]))


class DeviceWindows:
    def __init__(
        self, dataset: ParquetDataset, device: torch.device, binarization: str, seed: int, decode_threads: int
    ):
        self.dataset, self.device, self.binarization, self.seed = dataset, device, binarization, seed
        self.decode_threads = decode_threads
        self.on_gpu = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.on_gpu else None
        self.rule: Optional[DeviceBinarization] = None  # made with the first window: it depends on the stored dtype

    def batches(self, stream: EpochStream) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """The remaining batches of `stream`: x [B, D] float32 on the device and their dataset indices, every
        rank's `stream.num_batches` in all (empty batches at the end where this rank has fewer rows): cut by the
        host reader's rule (data/batching.py), so the same rows in the same batches."""
        windows, skip = stream.windows_to_read()
        key = 0 if self.binarization == "none" else binarization_key(self.binarization, self.seed, stream.epoch)
        empty = _DeviceRows(
            torch.zeros((0, self.dataset.dim), dtype=torch.float32, device=self.device), np.zeros(0, np.int64)
        )
        cut = batches_of(
            self._windows(stream, windows),
            stream.batch_size,
            skip=skip,
            emitted=stream.start_batch,
            num_batches=stream.num_batches,
            empty=lambda: empty,
        )
        for rows in cut:
            yield self._inputs(rows.rows_BD, rows.index_B, key) if len(rows) else (rows.rows_BD, rows.index_B)

    def _windows(self, stream: EpochStream, windows: list[list[int]]) -> Iterator["_DeviceRows"]:
        """Each window's rows on the device, in the reader's order: the next one read and copied while this one
        trains."""
        with (
            ThreadPoolExecutor(self.decode_threads, "aevb-decode") as decoders,
            ThreadPoolExecutor(1, "aevb-window") as ahead,
        ):
            pending = ahead.submit(self._load, stream, windows[0], decoders) if windows else None
            for i in range(len(windows)):
                window = pending.result()
                if i + 1 < len(windows):
                    pending = ahead.submit(self._load, stream, windows[i + 1], decoders)
                if window.ready is not None:
                    torch.cuda.current_stream(self.device).wait_event(window.ready)
                yield _DeviceRows(window.rows_WD, window.index_W)

    def _load(self, stream: EpochStream, ids: list[int], decoders: Executor) -> _Window:
        """A window's row groups decoded in parallel, on the device in the reader's order."""
        raws = list(decoders.map(self.dataset.read_raw, [self.dataset.units[u] for u in ids]))
        rows = np.concatenate([r.x for r in raws])
        index = np.concatenate([r.index for r in raws])
        is_bytes = self.binarization != "none" and self.dataset.is_bytes() and rows.dtype == np.uint8
        if not is_bytes:
            rows = self.dataset.to_unit_interval(rows)  # the reader's own scaling
        if self.rule is None and self.binarization != "none":
            self.rule = DeviceBinarization(rows.shape[1], self.device, is_bytes)
        order = stream.window_permutation(ids, len(rows)) if stream.shuffle else None
        host = torch.from_numpy(np.ascontiguousarray(rows))
        if not self.on_gpu:
            rows_WD = host if order is None else host[torch.from_numpy(order)]
            return _Window(rows_WD, index if order is None else index[order], None, None)
        pinned = host.pin_memory()
        with torch.cuda.stream(self.copy_stream):
            rows_WD = pinned.to(self.device, non_blocking=True)
            if order is not None:
                rows_WD = rows_WD.index_select(0, torch.from_numpy(order).to(self.device, non_blocking=True))
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        rows_WD.record_stream(torch.cuda.current_stream(self.device))  # used there: not reused before
        return _Window(rows_WD, index if order is None else index[order], ready, pinned)

    def _inputs(self, rows_BD: torch.Tensor, index_B: np.ndarray, key: int) -> tuple[torch.Tensor, np.ndarray]:
        if self.binarization == "none":
            return rows_BD.float(), index_B
        words_B = example_hashes(torch.from_numpy(index_B).to(self.device, non_blocking=True), key)
        return self.rule.bits(rows_BD, words_B).float(), index_B
