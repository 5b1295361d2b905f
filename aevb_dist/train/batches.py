"""What one rank trains on, epoch by epoch: the streaming reader's batches of `train.batch_size_per_worker`
(the epoch dealt to W ranks), or with `train.global_batch_size` the rank's part of every global batch
of a partitioned epoch (data/partitions.py), whose order does not depend on W. No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch

from aevb_dist.config.checks import check_partitioning
from aevb_dist.config.schema import DataConfig, TrainConfig
from aevb_dist.data.epoch_stream import EpochStream
from aevb_dist.data.partitions import PartitionedEpoch, partitioned_num_batches
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.data.schema import Batch
from aevb_dist.eval.model_input import model_input

Stream = Union[EpochStream, PartitionedEpoch]
# For a partitioned epoch, the partitions a batch's rows come from with their row counts (each partition's
# noise has its own generator); None elsewhere.
Segments = Optional[tuple[list[int], list[int]]]


@dataclass(frozen=True)
class StepBatch:
    """One rank's rows for one step: the one type every source yields (the host stream, a partitioned
    epoch's share of a global batch, windows streamed to the device, the device cache), and the one the step
    takes. What a new kind of data brings per row (covariates, an observed scalar) belongs here too, so that a
    new source is all it needs."""

    x_BD: torch.Tensor  # the rows' model inputs on the step's device, binarized where the model asks; [0, D] if none
    index_B: Any  # their dataset indices, named in messages (a NumPy array or a device tensor)
    # The noise ε's key: None, one generator of (seed, step, rank); else the partitions and their row counts
    # (each partition's rows draw from a generator of (seed, step, partition), so that a global batch's noise
    # does not depend on the worker count).
    noise_segments: Segments = None

    @staticmethod
    def from_host(batch: Batch, device: torch.device, noise_segments: Segments = None) -> "StepBatch":
        """Rows read on the host, copied to the step's device (asynchronously from pinned memory); sparse
        rows (counts) are made dense there, with their covariates' codes as x's last columns."""
        return StepBatch(model_input(batch, device), batch.index, noise_segments)


MAX_DEFAULT_PARTITIONS = 16


def default_num_partitions(data: ParquetDataset, global_batch_size: int) -> int:
    """Partitions for a run that does not set data.num_partitions: the most workers it can ever use."""
    return max(1, min(len(data.units), global_batch_size, MAX_DEFAULT_PARTITIONS))


class BatchSource:
    def __init__(
        self,
        dataset: ParquetDataset,
        *,
        train_cfg: TrainConfig,
        data_cfg: DataConfig,
        seed: int,
        rank: int,
        world_size: int,
        binarization: str,
        device: torch.device,
        device_data=None,
        device_windows=None,
        num_partitions: Optional[int] = None,
    ):
        """Rank `rank` of `world_size`'s batches of `dataset`, as the config's train and data sections and its
        seed say; `num_partitions`: a resumed run's recorded ones, else data.num_partitions or the default."""
        self.train_cfg, self.data_cfg, self.seed = train_cfg, data_cfg, seed
        self.data, self.rank, self.world_size = dataset, rank, world_size
        self.binarization, self.device, self.device_data = binarization, device, device_data
        self.device_windows = device_windows  # train/device_stream.py: windows binarized on the device
        self.global_batch_size = train_cfg.global_batch_size
        self.num_partitions = None
        if self.global_batch_size is not None:
            self.num_partitions = (
                num_partitions or data_cfg.num_partitions or default_num_partitions(dataset, self.global_batch_size)
            )
            check_partitioning(self.num_partitions, self.global_batch_size, world_size)

    def partitioning(self) -> Optional[dict]:
        """What a checkpoint records of a global-batch run's partitions (None for other runs)."""
        if self.num_partitions is None:
            return None
        return {"num_partitions": self.num_partitions, "global_batch_size": self.global_batch_size}

    def resumed(self, saved: Optional[dict]) -> Optional["BatchSource"]:
        """The source a run resumed from a checkpoint recording `saved` partitions reads: it keeps the
        checkpoint's data.num_partitions (a different value set in the config, or a different global batch, is
        refused: the data position would change). None for a run without partitions."""
        now = self.partitioning()
        if saved is None and now is None:
            return None
        if saved is None or now is None:
            raise ValueError(
                "this run was started "
                + ("without" if saved is None else "with")
                + " train.global_batch_size; resume it as it was started (or use a new run.name)"
            )
        if saved["global_batch_size"] != now["global_batch_size"]:
            raise ValueError(
                f"train.global_batch_size={now['global_batch_size']} differs from the run's "
                f"{saved['global_batch_size']}; a run keeps its global batch (or use a new run.name)"
            )
        configured = self.data_cfg.num_partitions
        if configured is not None and configured != saved["num_partitions"]:
            raise ValueError(
                f"data.num_partitions={configured} differs from the run's {saved['num_partitions']}, "
                "recorded in its first checkpoint; a run keeps its partitions (or use a new run.name)"
            )
        if saved["num_partitions"] == now["num_partitions"]:
            return self
        return BatchSource(
            self.data,
            train_cfg=self.train_cfg,
            data_cfg=self.data_cfg,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            binarization=self.binarization,
            device=self.device,
            device_data=self.device_data,
            device_windows=self.device_windows,
            num_partitions=saved["num_partitions"],
        )

    def read_ahead(self):
        """data.read_ahead; by default also on a GPU, whose step leaves the CPU free (data/prefetch.py)."""
        configured = self.data_cfg.read_ahead
        return True if configured is None and self.device.type == "cuda" else configured

    def num_batches(self, epoch: int) -> int:
        """Steps in `epoch`, the same on every rank."""
        if self.num_partitions is not None:
            return partitioned_num_batches(
                self.data,
                num_partitions=self.num_partitions,
                global_batch_size=self.global_batch_size,
                epoch=epoch,
                seed=self.seed,
                shuffle=self.data_cfg.shuffle,
            )
        return EpochStream(
            self.data,
            rank=0,
            world_size=self.world_size,
            batch_size=self.train_cfg.batch_size_per_worker,
            epoch=epoch,
            seed=self.seed,
            shuffle=self.data_cfg.shuffle,
        ).num_batches

    def total_steps(self) -> int:
        t = self.train_cfg
        if t.max_steps is not None:
            return t.max_steps
        return sum(self.num_batches(e) for e in range(t.num_epochs or 1))

    def stream(self, epoch: int, start_batch: int) -> Stream:
        common = dict(
            epoch=epoch,
            seed=self.seed,
            shuffle=self.data_cfg.shuffle,
            window=self.data_cfg.shuffle_window_row_groups,
            binarization=self.binarization,
            start_batch=start_batch,
            read_ahead=self.read_ahead(),
        )
        if self.num_partitions is not None:
            return PartitionedEpoch(
                self.data,
                rank=self.rank,
                world_size=self.world_size,
                num_partitions=self.num_partitions,
                global_batch_size=self.global_batch_size,
                **common,
            )
        return EpochStream(
            self.data,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.train_cfg.batch_size_per_worker,
            **common,
        )

    def epoch_batches(self, epoch: int, start_batch: int) -> Iterator[StepBatch]:
        """`batches` of epoch `epoch` from batch `start_batch` on."""
        yield from self.batches(self.stream(epoch, start_batch))

    def batches(self, stream: Stream) -> Iterator[StepBatch]:
        """Each remaining batch of the epoch: read by the streaming reader (binarized on the host, or on the
        device from its windows), or gathered from data.cache_on_device's copy (the same examples and bits)."""
        if isinstance(stream, PartitionedEpoch):
            for batch, partitions, sizes in stream:
                yield StepBatch.from_host(batch, self.device, (partitions, sizes))
        elif self.device_windows is not None and self.device_data is None:
            for x_BD, index_B in self.device_windows.batches(stream):
                yield StepBatch(x_BD, index_B)
        elif self.device_data is None:
            for batch in stream:
                yield StepBatch.from_host(batch, self.device)
        else:
            plan, words_N = self.device_data.plan(stream), self.device_data.epoch_words(stream.epoch)
            for b in range(stream.start_batch, stream.num_batches):
                positions_B = plan.positions[b, : int(plan.counts[b])]
                yield StepBatch(self.device_data.batch(positions_B, words_N), self.device_data.index_N[positions_B])
