"""Row groups kept in a worker's memory as decoded, up to a byte budget (`data.decoded_cache_mib`).

Reading a row group costs CPU time on every epoch (zstd, page checksums, for encoded images the PNG/JPEG
decoding) or a GET on remote storage. Training reads the same row groups each epoch, so the first read of
each is kept, as stored (uint8 pixels: 1 byte a pixel), until the budget is spent; later epochs gather and
binarize from memory. Whatever does not fit is read as before, so memory stays bounded by the budget plus
the shuffle windows, whatever the dataset's size. No eviction: the row groups kept first stay (the order
is shuffled every epoch, so which ones is immaterial, and a fixed set never churns).
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable

from aevb_dist.data.schema import Batch


class DecodedRowGroups:
    def __init__(self, budget_bytes: int):
        self.budget_bytes, self.used_bytes = budget_bytes, 0
        self._held: dict[Hashable, Batch] = {}
        self._lock = threading.Lock()  # read-ahead threads (one per stream) may read at once

    def __len__(self) -> int:
        return len(self._held)

    def get(self, unit: Hashable, read: Callable[[], Batch]) -> Batch:
        """`unit`'s rows: kept from an earlier `read()`, or read now (and kept while the budget allows).
        Kept arrays are read-only: a caller that wrote into one would change every later epoch's data."""
        held = self._held.get(unit)
        if held is not None:
            return held
        batch = read()
        size = sum(array.nbytes for array in batch.arrays())
        with self._lock:
            if unit not in self._held and self.used_bytes + size <= self.budget_bytes:
                for array in batch.arrays():
                    array.setflags(write=False)
                self._held[unit] = batch
                self.used_bytes += size
        return batch
