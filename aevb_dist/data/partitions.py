"""World-size-invariant epochs (`train.global_batch_size`): the order is defined over a fixed number of
data partitions, and workers take whole partitions.

Each epoch, the row groups are dealt to P partitions (`data.num_partitions`, fixed for the run) exactly
as `assign_row_groups` deals them to P ranks, and each partition's rows are ordered as `EpochStream`
orders a rank's. Global batch k is the union over partitions p of partition p's k-th slice of
`share_p` rows (the M rows of the global batch split as evenly as P allows). So which examples form
global batch k, in which order, with which binarization bits, depends on (seed, epoch, P, M) only —
never on the number of workers W. Worker r computes the partitions p with p mod W = r; the trainer
draws each partition's noise from its own generator (model/noise.py) and sums are all-reduced, so W
changes only the order of floating-point additions. The data position is one integer (global batches
consumed in the epoch), the same for any W: a run resumed with another W continues where it stopped.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

from aevb_dist.config.checks import check_partitioning
from aevb_dist.data.epoch_stream import EpochStream, assign_row_groups
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.data.schema import Batch, concat


def partition_shares(global_batch_size: int, num_partitions: int) -> list[int]:
    """Rows of each global batch that each partition gives: M split as evenly as P allows."""
    base, extra = divmod(global_batch_size, num_partitions)
    return [base + (1 if p < extra else 0) for p in range(num_partitions)]


def owned_partitions(rank: int, world_size: int, num_partitions: int) -> list[int]:
    return list(range(rank, num_partitions, world_size))


def partitioned_num_batches(
    dataset: ParquetDataset, *, num_partitions: int, global_batch_size: int, epoch: int, seed: int, shuffle: bool
) -> int:
    """Global batches in the epoch: the partition that takes the most steps to run out."""
    shares = partition_shares(global_batch_size, num_partitions)
    assignment = assign_row_groups(dataset.units, num_partitions, seed=seed, epoch=epoch, shuffle=shuffle)
    rows = [sum(dataset.units[u].num_rows for u in ids) for ids in assignment]
    return max(math.ceil(r / share) for r, share in zip(rows, shares))


class PartitionedEpoch:
    """One rank's part of every global batch of an epoch: for each batch, the concatenated slices of the
    partitions it owns, and the partitions and row counts of those slices (for their noise)."""

    def __init__(
        self,
        dataset: ParquetDataset,
        *,
        rank: int,
        world_size: int,
        num_partitions: int,
        global_batch_size: int,
        epoch: int,
        seed: int,
        shuffle: bool = True,
        window: int = 4,
        binarization: str = "none",
        start_batch: int = 0,
        read_ahead: Optional[bool] = None,
    ):
        check_partitioning(num_partitions, global_batch_size, world_size)
        self.epoch, self.start_batch = epoch, start_batch
        self.num_batches = partitioned_num_batches(
            dataset,
            num_partitions=num_partitions,
            global_batch_size=global_batch_size,
            epoch=epoch,
            seed=seed,
            shuffle=shuffle,
        )
        shares = partition_shares(global_batch_size, num_partitions)
        self.partitions = owned_partitions(rank, world_size, num_partitions)
        self.streams = [
            EpochStream(
                dataset,
                rank=p,
                world_size=num_partitions,
                batch_size=shares[p],
                epoch=epoch,
                seed=seed,
                shuffle=shuffle,
                window=window,
                binarization=binarization,
                start_batch=start_batch,
                num_batches=self.num_batches,
                read_ahead=read_ahead,
            )
            for p in self.partitions
        ]

    def __iter__(self) -> Iterator[tuple[Batch, list[int], list[int]]]:
        """(the rank's rows of the global batch, the partitions they come from, rows from each)."""
        for slices in zip(*self.streams):
            yield concat(list(slices)), self.partitions, [len(b) for b in slices]
