"""The training step as one CUDA graph (`train.use_gpu=true`, `train.cuda_graph=true`): fed from the device
cache's epoch (`data.cache_on_device=true`), or one streamed batch at a time (train/device_stream.py).

A small VAE's step is ~150-200 kernels of a few microseconds each (194 for Burda et al.'s model,
measured on an H100: benchmarks/gpu_profile.py): launched one by one from Python, the GPU waits on
the host. Here the whole step — gather the batch from the epoch's inputs (binarized on the device
when the epoch starts), the bound and its gradient, the all-reduce of [gradients, ELBO sum, count],
the division by the global count and the optimizer update — is captured once and replayed, so a
step costs one launch. The math is the eager step's: the same two halves (Trainer.step_sums, apply_step),
and the noise of step s is drawn from the device's generator seeded with the eager step's seed
(`Trainer.seed_of_step`) before each replay, so ε is the eager step's ε. Static shapes: every replay sees
batch_size rows; a short last batch is padded with weight-0 rows (its ε is drawn for the padded shape, so that one
step's noise differs from the eager step's).

What the eager step checks each step, the graph counts on the device: a step whose ELBO or gradient
is not finite is counted, and the run stops with NonFiniteError at the next log line (the optimizer
has applied it: with `train.on_nonfinite=skip` use the eager step, `train.cuda_graph=false`).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from aevb_dist.train.collectives import ELBO_SUM, STOP_VOTES
from aevb_dist.train.device_data import EpochPlan, FusedInputs

_EPOCH_CHUNK_ROWS = 8192


class CapturedStep:
    def __init__(self, trainer, streamed: bool = False):
        """`streamed`: one batch at a time from streamed windows (load_batch) instead of the cached epoch."""
        self.trainer, self.streamed = trainer, streamed
        data, device = trainer.source.device_data, trainer.device
        size = trainer.train_cfg.batch_size_per_worker
        if streamed:  # one batch, put in place before each replay
            capacity, dim, dtype = 1, trainer.source.data.dim, torch.float32
        else:
            # The epoch's inputs and weights, in buffers the graph reads. Epochs can differ in length (row groups
            # are dealt anew), so the buffers hold the most batches a rank can have; rows past the epoch weigh
            # 0. The inputs are binarized for the whole epoch when it starts (load_epoch): the same bits, but a
            # dozen int64 kernels over [B, D] per step become a few over [rows, D] per epoch (the hash is
            # launch-bound at small B), and the step only gathers its batch and casts it. On a GPU the epoch's
            # binarization is one compiled kernel (FusedInputs): eager, it is memory-bound at large B.
            self.epoch_inputs = FusedInputs(data) if device.type == "cuda" else data.inputs
            capacity, dim, dtype = -(-trainer.source.data.num_rows // size), data.rows_ND.shape[1], data.input_dtype
        self.inputs_NBD = torch.zeros((capacity, size, dim), dtype=dtype, device=device)
        self.weights_NB = torch.zeros((capacity, size), device=device)
        self.batch_no = torch.zeros((), dtype=torch.int64, device=device)  # which row of the plan
        self.elbo_total = torch.zeros((), dtype=torch.float64, device=device)  # global ELBO sums since last read
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)
        # This rank's stop vote, set from the host when its probe turns true; the graph copies it into the
        # flat buffer, and the reduced votes are read at log lines (where the host syncs anyway).
        self.stop_vote = torch.zeros((), device=device)
        # The graph draws from the device's default generator (CUDA graphs replay it from its seed).
        self.generator = (
            torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator
        )
        self.graph = None
        self.stop_vote_sent = False

    def load_epoch(self, plan: EpochPlan, words_N: torch.Tensor, start_batch: int) -> None:
        """Point the captured gather at a new epoch: the graph reads these buffers, so they are filled in place."""
        num_batches, size = plan.positions.shape
        chunk = max(1, _EPOCH_CHUNK_ROWS // size)  # bounds eager torch's int64 temporaries (~50 MB each)
        for first in range(0, num_batches, chunk):
            positions = plan.positions[first : first + chunk].reshape(-1)
            self.inputs_NBD[first : first + chunk].copy_(
                self.epoch_inputs(positions, words_N).view(-1, size, self.inputs_NBD.shape[2])
            )
        self.inputs_NBD[num_batches:].zero_()
        self.weights_NB[:num_batches].copy_(plan.weights)
        self.weights_NB[num_batches:].zero_()
        self.batch_no.fill_(start_batch)

    def load_batch(self, x_BD: torch.Tensor) -> None:
        """A streamed batch into the graph's one-batch buffer, padded to the batch size with weight-0 rows."""
        count = x_BD.shape[0]
        self.inputs_NBD[0, :count].copy_(x_BD)
        self.inputs_NBD[0, count:].zero_()
        self.weights_NB[0, :count].fill_(1.0)
        self.weights_NB[0, count:].zero_()

    def _step(self) -> None:
        """The eager step's two halves (Trainer.step_sums, Trainer.apply_step) around what the graph counts on the
        device where the eager step checks on the host; the noise comes from the device's generator, seeded
        before each replay."""
        tr = self.trainer
        x_BD = self.inputs_NBD.index_select(0, self.batch_no).squeeze(0).float()
        weight_B = self.weights_NB.index_select(0, self.batch_no).squeeze(0)
        tr.step_sums(x_BD, weight_B, weight_B.sum(), None, self.stop_vote)
        self.nonfinite_steps += (~tr.step_finite()).long()
        self.elbo_total += tr.flat[ELBO_SUM].double()
        tr.apply_step()
        if not self.streamed:  # a streamed step reads its one buffer every time
            self.batch_no += 1

    def capture(self) -> None:
        """Warm up on a side stream (kernel choice, lazy optimizer state, compilation), record one step,
        then put the model, the optimizer and the counters back as they were before the warm-up."""
        tr = self.trainer
        saved_model = {k: v.clone() for k, v in tr.vae.state_dict().items()}
        saved_optim = {
            id(p): {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in tr.optimizer.state.items()
        }
        saved_batch_no = self.batch_no.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        with torch.no_grad():  # in place: the graph holds these very tensors
            for key, value in tr.vae.state_dict().items():
                value.copy_(saved_model[key])
            for p, st in tr.optimizer.state.items():
                for k, v in st.items():
                    if torch.is_tensor(v):
                        v.copy_(saved_optim[id(p)][k]) if id(p) in saved_optim else v.zero_()
        self.batch_no.copy_(saved_batch_no)
        self.elbo_total.zero_()
        self.nonfinite_steps.zero_()

    def replay(self, step: int) -> None:
        """Step `step`: the graph, or before capture (and in tests on a CPU) the same computation eagerly."""
        self.generator.manual_seed(self.trainer.seed_of_step(step))
        if not self.stop_vote_sent and self.trainer.stop_probe():
            self.stop_vote.fill_(1.0)
            self.stop_vote_sent = True
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()


class CapturedSteps:
    """The captured step as the training loop's step runner (`Trainer.fit`): each epoch's inputs loaded
    into the graph's buffers, then one replay a step. The window's ELBO sum stays on the device until a log
    line reads it, and a stop request is seen there (reading the reduced votes each step would sync the host
    with the GPU each step). On a CPU there is no graph to capture: the same step body runs as it is."""

    def __init__(self, trainer):
        self.streamed = trainer.source.device_data is None  # fed from train/device_stream.py's windows
        self.trainer, self.step = trainer, CapturedStep(trainer, self.streamed)
        self.capture = trainer.device.type == "cuda"

    def epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[Optional[float], int]]:
        t = self.trainer
        stream = t.source.stream(epoch, start_batch)
        if self.streamed:
            yield from self._streamed_epoch(stream, start_batch)
            return
        data = t.source.device_data
        self.step.load_epoch(data.plan(stream), data.epoch_words(t.state.epoch), start_batch)
        global_counts = stream.global_counts()
        if self.capture and self.step.graph is None:
            self.step.capture()
        for b in range(start_batch, stream.num_batches):
            self.step.replay(t.state.step)
            yield None, int(global_counts[b])

    def _streamed_epoch(self, stream, start_batch: int) -> Iterator[tuple[Optional[float], int]]:
        t = self.trainer
        global_counts = stream.global_counts()
        for b, batch in enumerate(t.source.batches(stream), start=start_batch):
            self.step.load_batch(batch.x_BD)
            if self.capture and self.step.graph is None:
                self.step.capture()
            self.step.replay(t.state.step)
            yield None, int(global_counts[b])

    def read_window(self, window: dict) -> None:
        _read_sums(self.trainer, self.step, window)


def _read_sums(trainer, step: CapturedStep, window: dict) -> None:
    """At a log line: the window's ELBO sum from the device, and the non-finite check the graph counted."""
    bad = int(step.nonfinite_steps.item())
    if bad:
        trainer.raise_nonfinite(f"{bad} step(s) up to step {trainer.state.step} (captured CUDA graph step)")
    window["elbo"] = step.elbo_total.item()
    step.elbo_total.zero_()
    trainer.stop_requested = trainer.stop_requested or trainer.flat[STOP_VOTES].item() > 0
