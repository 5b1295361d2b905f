"""Cutting an epoch's windows of rows into a rank's batches: the one rule of every streamed epoch, whether
the rows are on the host (data/reader.py's `EpochStream`) or already on the device (train/device_stream.py).
No I/O, no torch.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Protocol, TypeVar


class Rows(Protocol):
    """Rows in a fixed order, however they are held (a host `schema.Batch`, or a window on the device)."""

    def __len__(self) -> int: ...

    def rows(self, start: int, stop: int) -> "Rows":
        """Rows `start` to `stop` (exclusive)."""

    def then(self, other: "Rows") -> "Rows":
        """These rows followed by `other`'s."""


R = TypeVar("R", bound=Rows)


def batches_of(
    windows: Iterable[R], batch_size: int, *, skip: int, emitted: int, num_batches: int, empty: Callable[[], R]
) -> Iterator[R]:
    """The epoch's remaining batches from its `windows`, in order: the first `skip` rows left out (those a
    resumed epoch's earlier batches took; `emitted` of its `num_batches` are behind it), then batches of
    `batch_size` rows (one may span two windows), then the last, shorter one, then `empty()` ones up to
    `num_batches`: every rank takes part in every step's all-reduce, and a rank with fewer rows adds
    nothing to its sums."""
    carry: Optional[R] = None
    for current in windows:
        if skip:
            current, skip = current.rows(skip, len(current)), 0
        carry = current if carry is None or not len(carry) else carry.then(current)
        while len(carry) >= batch_size:
            yield carry.rows(0, batch_size)
            carry = carry.rows(batch_size, len(carry))
            emitted += 1
    if carry is not None and len(carry):
        yield carry
        emitted += 1
    for _ in range(num_batches - emitted):
        yield empty()
