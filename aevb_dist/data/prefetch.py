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
from typing import Callable, Optional

from aevb_dist import storage


class _Deferred:
    def __init__(self, load: Callable, args: tuple):
        self._load, self._args = load, args

    def result(self):
        return self._load(*self._args)


class LoadWhenNeeded:
    """A thread pool's submit/result, but the work runs in the caller's thread when `result()` asks for it."""

    def __enter__(self) -> "LoadWhenNeeded":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def submit(self, load: Callable, *args) -> _Deferred:
        return _Deferred(load, args)


def window_loader(dataset, read_ahead: Optional[bool] = None):
    """A context manager with `submit(load, *args).result()` for a ParquetDataset's windows: a one-thread
    pool when `read_ahead` (None: for remote storage, and for encoded images, whose decoding is the
    heavy part and is what the thread is for), else loading in the caller's thread when needed."""
    if read_ahead is None:
        read_ahead = not storage.is_local(dataset.fs) or bool(dataset.image_column)
    if not read_ahead:
        return LoadWhenNeeded()
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="aevb-read")
