"""Where the reader loads the next shuffle window: ahead in a background thread, or when it is needed.

Remote storage (S3, GCS, ...): ahead, in one thread — a GET waits tens of milliseconds on the network, and
the steps go on meanwhile. Local files, training on CPU: when needed, in the training thread. Reading them
is CPU work (page-cache copies, zstd, checksums, binarization), not waiting, and the step's compute
threads already use every core: a third thread makes one of them wait at each parallel operation's end,
so the step loses more than the reader's own CPU time (on 2 cores, the paper's MNIST model at M=100: ~4%
of throughput more than loading in line). Training on a GPU leaves the CPU free: ahead again
(`data.read_ahead`, set by the trainer, decides; None is this module's rule). Parquet of encoded
PNG/JPEG images (`data.image_column`) is decoded ahead in the thread wherever it is stored.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from aevb_dist.run import storage

Item, Loaded = TypeVar("Item"), TypeVar("Loaded")
_END = object()


def reads_ahead(dataset, read_ahead: Optional[bool] = None) -> bool:
    """Whether a ParquetDataset's windows load ahead in a thread: `read_ahead` where set (data.read_ahead),
    else for remote storage and for encoded images (whose decoding is the heavy part, and what the thread is
    for); local Parquet otherwise loads in the caller's thread, when needed."""
    if read_ahead is not None:
        return read_ahead
    return not storage.is_local(dataset.fs) or bool(dataset.image_column)


def loaded_ahead(load: Callable[[Item], Loaded], items: Iterable[Item]) -> Iterator[Loaded]:
    """`load(item)` for each item in order, each loaded in one background thread while the previous one is
    used."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="aevb-read") as pool:

        def load_next():  # the next item's load, started; None after the last
            item = next(items, _END)
            return None if item is _END else pool.submit(load, item)

        pending = load_next()
        while pending is not None:
            current = pending.result()
            pending = load_next()  # read while `current` is used
            yield current
