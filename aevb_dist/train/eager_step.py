"""The two ways the training loop takes its steps share one protocol (`StepRunner`): the eager step here, a batch
at a time through `Trainer.step_on`, and the captured CUDA graph (captured_step.py)."""

from __future__ import annotations

from typing import Iterator, Optional, Protocol


class StepRunner(Protocol):
    """What the training loop drives: one epoch's steps, and the window's sums at a log line."""

    def epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[Optional[float], int]]:
        """Take epoch `epoch`'s steps from `start_batch` on (read from the trainer's batch source), yielding
        each step's global (ELBO sum or None when it stays on the device, example count)."""

    def read_window(self, window: dict) -> None:
        """Before a log line: bring the window's sums that the steps kept elsewhere into `window`."""


class EagerSteps:
    """The eager step: each batch from the reader, through `Trainer.step_on`."""

    def __init__(self, trainer):
        self.trainer = trainer

    def epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[Optional[float], int]]:
        for batch in self.trainer.source.epoch_batches(epoch, start_batch):
            yield self.trainer.step_on(batch)

    def read_window(self, window: dict) -> None:
        """The eager step's sums are on the host already."""
