"""One rank's epoch of a `ParquetDataset` (reader.py): the row groups dealt to the ranks, the rows shuffled within
windows of row groups, and the batches cut from them (batching.py), from any data position on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional

import numpy as np

from aevb_dist import seeds
from aevb_dist.data.batching import batches_of
from aevb_dist.data.binarization import binarize, binarize_bytes
from aevb_dist.data.prefetch import loaded_ahead, reads_ahead
from aevb_dist.data.reader import ParquetDataset, RowGroup
from aevb_dist.data.schema import Batch, concat


def assign_row_groups(
    units: list[RowGroup], world_size: int, *, seed: int, epoch: int, shuffle: bool
) -> list[list[int]]:
    """Unit ids per rank: a seeded permutation dealt greedily to the rank with the fewest rows."""
    order = np.arange(len(units))
    if shuffle:
        order = np.random.default_rng(seeds.epoch_order_seed(seed, epoch)).permutation(len(units))
    loads = [0] * world_size
    assignment: list[list[int]] = [[] for _ in range(world_size)]
    for uid in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        assignment[rank].append(int(uid))
        loads[rank] += units[uid].num_rows
    return assignment


def to_model_input(dataset: ParquetDataset, raw: Batch, binarization: str, *, seed: int, epoch: int) -> Batch:
    """Stored values → what the model reads: [0, 1] intensities, binarized for Bernoulli models; counts as they are."""
    if binarization != "none" and dataset.is_bytes() and raw.x.dtype == np.uint8:
        return binarize_bytes(raw, binarization, seed=seed, epoch=epoch)
    scaled = dataclasses.replace(raw, x=dataset.to_unit_interval(raw.x))
    return binarize(scaled, binarization, seed=seed, epoch=epoch)


class EpochStream:
    """One rank's batches for one epoch; every rank yields exactly `num_batches` (some may be empty)."""

    def __init__(
        self,
        dataset: ParquetDataset,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        epoch: int,
        seed: int,
        shuffle: bool = True,
        window: int = 4,
        binarization: str = "none",
        start_batch: int = 0,
        num_batches: Optional[int] = None,
        read_ahead: Optional[bool] = None,
    ):
        self.dataset, self.batch_size, self.epoch, self.seed = dataset, batch_size, epoch, seed
        self.shuffle, self.window, self.binarization, self.read_ahead = shuffle, window, binarization, read_ahead
        assignment = assign_row_groups(dataset.units, world_size, seed=seed, epoch=epoch, shuffle=shuffle)
        self.unit_ids = assignment[rank]
        rows = [sum(dataset.units[u].num_rows for u in ids) for ids in assignment]
        self.num_rows, self.rows_per_rank = rows[rank], rows
        # The longest rank's batches, unless the caller sets the epoch's length (data/partitions.py).
        self.num_batches = max(math.ceil(r / batch_size) for r in rows) if num_batches is None else num_batches
        self.start_batch = start_batch
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"data position {start_batch} is outside this epoch's {self.num_batches} batches")

    def global_counts(self) -> np.ndarray:
        """Examples in each of the epoch's batches, summed over all ranks: [num_batches]."""
        starts = np.arange(self.num_batches) * self.batch_size
        return sum(np.clip(rows - starts, 0, self.batch_size) for rows in self.rows_per_rank)

    def _windows(self) -> list[list[int]]:
        return [self.unit_ids[i : i + self.window] for i in range(0, len(self.unit_ids), self.window)]

    def window_permutation(self, ids: list[int], num_rows: int) -> np.ndarray:
        """The order of a window's rows (stored order → the order they are yielded in)."""
        return np.random.default_rng(seeds.window_seed(self.seed, self.epoch, ids[0])).permutation(num_rows)

    def windows_to_read(self) -> tuple[list[list[int]], int]:
        """The windows from the data position on (whole windows before it skipped by their row counts, unread),
        and how many of the first one's rows (in yielded order) lie before it."""
        skip = self.start_batch * self.batch_size
        windows = []
        for ids in self._windows():
            size = sum(self.dataset.units[u].num_rows for u in ids)
            if not windows and skip >= size:
                skip -= size
            else:
                windows.append(ids)
        return windows, skip

    def row_positions(self) -> np.ndarray:
        """The rows this rank's epoch yields, in order, as positions in the dataset's stored order (its
        units concatenated): what iterating yields, computed from the footers without reading a row."""
        first, units = self.dataset.first_rows, self.dataset.units
        parts = []
        for ids in self._windows():
            rows = np.concatenate([np.arange(first[units[u]], first[units[u]] + units[u].num_rows) for u in ids])
            parts.append(rows[self.window_permutation(ids, len(rows))] if self.shuffle else rows)
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _load_window(self, ids: list[int]) -> Batch:
        batch = concat([self.dataset.read_raw(self.dataset.units[u]) for u in ids])
        if self.shuffle:
            perm = self.window_permutation(ids, len(batch))
            batch = batch.taken(perm)
        return to_model_input(self.dataset, batch, self.binarization, seed=self.seed, epoch=self.epoch)

    def __iter__(self) -> Iterator[Batch]:
        windows, skip = self.windows_to_read()
        # In a thread, or in this one when needed (prefetch.py says which).
        ahead = reads_ahead(self.dataset, self.read_ahead)
        loaded = loaded_ahead(self._load_window, windows) if ahead else map(self._load_window, windows)
        empty = self.dataset.empty_batch()
        try:
            yield from batches_of(
                loaded,
                self.batch_size,
                skip=skip,
                emitted=self.start_batch,
                num_batches=self.num_batches,
                empty=lambda: empty,
            )
        finally:
            if ahead:
                loaded.close()  # the thread ends with its pending window when a consumer stops early
