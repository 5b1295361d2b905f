"""The data-parallel training loop. No Ray here: the worker (worker.py) passes in the callables.

Gradients are reduced as sums: every rank backpropagates −(Σ of its examples' objective),
one all-reduce adds gradients, ELBO sums and example counts across ranks, and the
gradient is divided once by the global count. That is exactly the gradient of the
global minibatch mean (eq. 8 / N) even when ranks hold different numbers of examples,
including none at the end of an epoch, where a DDP mean of means would be wrong.

Noise ε is drawn from a generator seeded by (seed, step, rank) — with `train.global_batch_size`,
one per data partition, seeded by (seed, step, partition), so the noise does not depend on the
worker count either — so the random state is a function of the step: a resumed run draws the same
noise as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from aevb_dist import names, seeds
from aevb_dist.config.checks import captured_step_cannot_serve
from aevb_dist.config.schema import CheckpointConfig, OptimConfig, TrainConfig
from aevb_dist.console import say
from aevb_dist.data.epoch_stream import assign_row_groups
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.data.statistics import mean_intensity
from aevb_dist.eval.evaluation import evaluate_units
from aevb_dist.model.elbo import add_prior_gradient, per_example_bound, sgvb_b_terms, weighted_kl_objective
from aevb_dist.model.noise import SegmentedNoise
from aevb_dist.model.vae import VAE
from aevb_dist.train.batches import BatchSource, Segments, StepBatch
from aevb_dist.train.captured_step import CapturedSteps
from aevb_dist.train.collectives import (
    COUNT,
    ELBO_SUM,
    NUM_SCALARS,
    OBJECTIVE_SUM,
    STOP_VOTES,
    all_reduce_step_sums,
    all_reduce_sum,
)
from aevb_dist.train.eager_step import EagerSteps, StepRunner
from aevb_dist.train.optimizers import learning_rate, set_learning_rate


def step_generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    """Step `step`'s noise on rank (or partition) `stream`, by the rule in seeds.py."""
    return torch.Generator(device=device).manual_seed(seeds.step_seed(seed, step, stream))


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # the data position: batches of `epoch` already consumed
    samples_seen: int = 0
    skipped_steps: int = 0
    world_size: int = 1


class NonFiniteError(ValueError):
    pass


class Trainer:
    """One rank's view of data-parallel training."""

    def __init__(
        self,
        vae: VAE,
        optimizer: torch.optim.Optimizer,
        source: BatchSource,
        test_data: Optional[ParquetDataset] = None,
        *,
        train_cfg: TrainConfig,
        optim_cfg: OptimConfig,
        checkpoint_cfg: CheckpointConfig,
        seed: int,
        test_binarization: str,
        bias_from_data_mean: bool,
        stop_probe: Callable[[], bool] = lambda: False,
        data_mean: Optional[list[float]] = None,
        saved: Optional[dict] = None,
    ):
        """Trains `vae` (on `source.device`) with `optimizer` on the batches of `source`, this rank's of the
        training set, and evaluates it on `test_data` (binarized by `test_binarization`), as the config's
        train, optim and checkpoint sections and its seed say (`worker.trainer_for_config` builds all of them
        from a config). `stop_probe()`: whether this rank asks to stop after the current step (read every step:
        a flag, no I/O). `bias_from_data_mean` (model.output_bias_init=data_mean): a new run sets the decoder's
        output bias from the training set's mean pixel, `data_mean` as the driver computed it (else computed
        here). `saved`: a checkpoint's state to resume from (`load_state_dict`; its warning, if any, in
        `resume_note`)."""
        self.train_cfg, self.optim_cfg, self.checkpoint_cfg, self.seed = train_cfg, optim_cfg, checkpoint_cfg, seed
        self.test_binarization, self.bias_from_data_mean = test_binarization, bias_from_data_mean
        self.vae, self.optimizer, self.source, self.test_data = vae, optimizer, source, test_data
        self.rank, self.world_size, self.device = source.rank, source.world_size, source.device
        self.data_mean = data_mean
        self.stop_probe = stop_probe
        self.stop_requested = False  # some rank asked: the step just taken is checkpointed and fit() returns
        self.graphed = self.device.type == "cuda" and train_cfg.cuda_graph and self._graph_serves()
        # torch.compile traces the bound once per shape; the noise draws stay eager (graph breaks).
        self.bound_sum = torch.compile(self._bound_sum) if train_cfg.compile else self._bound_sum
        self.params = list(self.vae.parameters())
        # One flat buffer holds every gradient (as views), then the ELBO sum, the example count and the stop votes:
        # backward accumulates straight into it and a single in-place all-reduce sums it, with no
        # per-step copies (what DDP calls gradient_as_bucket_view).
        self.flat = torch.zeros(sum(p.numel() for p in self.params) + NUM_SCALARS, device=self.device)
        offset = 0
        for p in self.params:
            p.grad = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        # KL warm-up or free bits: the step optimizes another objective than the bound it logs.
        self.weighs_kl = bool(train_cfg.kl_warmup_steps) or train_cfg.free_bits is not None
        self.objective_in_window = 0.0  # the optimized objective's global sum since the last log line
        self._grad_comm_dtype = torch.bfloat16 if train_cfg.allreduce_dtype == "bfloat16" else None
        self.state = TrainState(world_size=self.world_size)
        self._total_steps: Optional[int] = None  # counted once per batch source, when first asked
        self.resume_note = self.load_state_dict(saved) if saved is not None else None

    @property
    def total_steps(self) -> int:
        """The run's length in steps: train.max_steps, or the configured epochs' batches."""
        if self._total_steps is None:
            self._total_steps = self.source.total_steps()
        return self._total_steps

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.vae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": dataclasses.asdict(self.state),
            "image_shape": list(self.source.data.shape),
            "partitioning": self.source.partitioning(),
            "data_mean": self.data_mean,  # what model.output_bias_init=data_mean started from
            "counts": self.source.data.counts_identity(),  # the genes and covariate categories the inputs stand for
        }

    def load_state_dict(self, saved: dict) -> Optional[str]:
        """Restore everything; returns a warning when the data position cannot carry over."""
        try:
            self.vae.load_state_dict(saved["model"])
        except RuntimeError as err:
            raise ValueError(
                "the checkpoint holds a model of a different shape than model.* in the config: "
                + str(err).splitlines()[1 if len(str(err).splitlines()) > 1 else 0].strip()
            ) from None
        rates = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved["optimizer"])
        # The rate is the config's schedule's (set as each epoch starts), held in the object a captured graph reads.
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        self.state = TrainState(**saved["state"])
        self.data_mean = saved.get("data_mean")
        self.source.data.check_counts_identity(saved.get("counts"))
        resumed = self.source.resumed(saved.get("partitioning"))
        if resumed is not None:
            self.source, self._total_steps = resumed, None
            self.state.world_size = self.world_size  # global batches do not depend on it: the epoch goes on
        elif self.state.world_size != self.world_size:
            old = self.state.world_size
            self.state.batch_in_epoch, self.state.world_size = 0, self.world_size
            return (
                f"resuming with {self.world_size} workers instead of {old}: row groups are dealt anew, "
                f"so epoch {self.state.epoch} restarts from its beginning"
            )
        return None

    # -- one step ----------------------------------------------------------------------------
    def _bound_sum(
        self, x_BD: torch.Tensor, weight_B: Optional[torch.Tensor], generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        """Σ_i L̃(x_i) over the batch (eq. 7 or 6 per example); `weight_B` zeroes padding rows."""
        t = self.train_cfg
        bound_B = per_example_bound(self.vae, x_BD, t.estimator, t.num_latent_samples, generator=generator)
        return bound_B.sum() if weight_B is None else (bound_B * weight_B).sum()

    def accumulate_gradients(
        self, x_BD: torch.Tensor, weight_B: Optional[torch.Tensor], count, generator: Optional[torch.Generator]
    ) -> None:
        """Backpropagate this rank's −(objective sum) into the flat buffer; its ELBO sum and count into the tail."""
        if self.weighs_kl:  # the eager step only (config.checks.captured_step_cannot_serve)
            elbo_sum, objective_sum = self._weighted_kl_sums(x_BD, generator)
        else:
            elbo_sum = objective_sum = self.bound_sum(x_BD, weight_B, generator)
        (-objective_sum).backward()
        # MAP: the gradient of map_objective_sum's prior term (eq. 8 / N), in closed form.
        add_prior_gradient(self.params, self.train_cfg.theta_prior_std, count, self.source.data.num_rows)
        self.flat[OBJECTIVE_SUM] = objective_sum.detach()
        self.flat[ELBO_SUM] = elbo_sum.detach()
        self.flat[COUNT] = count

    def _weighted_kl_sums(self, x_BD: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(ELBO sum, optimized objective's sum) with KL warm-up (this step's β) and free bits (estimator B)."""
        t = self.train_cfg
        log_likelihood_B, kl_BZ = sgvb_b_terms(self.vae, x_BD, t.num_latent_samples, generator)
        beta = min(1.0, self.state.step / t.kl_warmup_steps) if t.kl_warmup_steps else 1.0
        objective_B = weighted_kl_objective(log_likelihood_B, kl_BZ, beta, t.free_bits)
        return (log_likelihood_B - kl_BZ.sum(-1)).sum(), objective_B.sum()

    def step_sums(self, x_BD: torch.Tensor, weight_B, count, noise, stop_vote) -> None:
        """The first half of both steps (eager, captured): this rank's −(objective sum) backpropagated into the flat
        buffer, its sums and stop vote in its tail (numbers, or device tensors in a CUDA graph), all-reduced."""
        self.flat.zero_()  # an empty batch contributes zero gradients, a zero ELBO sum and a zero count
        if x_BD.shape[0]:
            self.accumulate_gradients(x_BD, weight_B, count, noise)
        self.flat[STOP_VOTES] = stop_vote
        all_reduce_step_sums(self.flat, self._grad_comm_dtype)

    def step_finite(self) -> torch.Tensor:
        """Whether the reduced ELBO sum and gradient are finite: a device bool, the eager and the captured step's."""
        return torch.isfinite(self.flat[ELBO_SUM]) & torch.isfinite(self.flat[:-NUM_SCALARS].sum())

    def apply_step(self) -> None:
        """The second half of both: the gradient sum divided once by the global count (eq. 8 / N), the update."""
        self.flat[:-NUM_SCALARS].div_(self.flat[COUNT].clamp_min(1.0))
        self.optimizer.step()

    def seed_of_step(self, step: int) -> int:
        return seeds.step_seed(self.seed, step, self.rank)

    def _noise(self, segments: Segments):
        """Step s's noise: one generator of (seed, s, rank), or per partition one of (seed, s, partition)."""
        seed, step = self.seed, self.state.step
        if segments is None:
            return step_generator(seed, step, self.rank, self.device)
        partitions, sizes = segments
        return SegmentedNoise([step_generator(seed, step, p, self.device) for p in partitions], sizes)

    def step_on(self, batch: StepBatch) -> tuple[float, int]:
        """The eager step, checked on the host between the halves; returns its global (ELBO sum, example count)."""
        count = batch.x_BD.shape[0]
        noise = self._noise(batch.noise_segments) if count else None
        self.step_sums(batch.x_BD, None, count, noise, float(self.stop_probe()))
        global_objective, global_elbo, global_count, stop_votes = self.flat[-NUM_SCALARS:].tolist()
        self.stop_requested = self.stop_requested or stop_votes > 0
        if not self.step_finite().item():
            return self._nonfinite(batch.index_B, global_elbo)
        self.apply_step()
        self.objective_in_window += global_objective
        return global_elbo, int(global_count)

    def _nonfinite(self, index_B, elbo: float) -> tuple[float, int]:
        where = (
            f"step {self.state.step} (epoch {self.state.epoch}, batch {self.state.batch_in_epoch}, "
            f"rank {self.rank} example indices {index_B[:3].tolist()}...)"
        )
        if self.train_cfg.on_nonfinite == "error":
            self.raise_nonfinite(f"{where}: ELBO sum {elbo}")
        self.state.skipped_steps += 1
        return math.nan, 0

    @staticmethod
    def raise_nonfinite(where: str) -> None:
        raise NonFiniteError(
            f"non-finite objective or gradient at {where}; lower optim.lr or set train.on_nonfinite=skip"
        )

    def _check_parameters_finite(self) -> None:
        """Never write a corrupted checkpoint: parameters that went non-finite stop the run here."""
        if not all(torch.isfinite(p).all() for p in self.params):
            raise NonFiniteError(
                f"model parameters became non-finite by step {self.state.step}; not saving a "
                "corrupted checkpoint (the last good one stays the one a resume uses). "
                "Lower optim.lr"
            )

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, data: ParquetDataset) -> float:
        """Dataset mean of the bound (estimator B, L=1), as `aevb-dist evaluate` computes it (eval/evaluation.py:
        a row group's noise is seeded by (seed, row group), so the result does not depend on the worker count):
        this rank's row groups, sums and counts all-reduced, divided once."""
        ids = assign_row_groups(data.units, self.world_size, seed=self.seed, epoch=0, shuffle=False)[self.rank]
        sums = evaluate_units(
            self.vae,
            data,
            ids,
            num_importance_samples=0,
            batch_size=names.EVAL_BATCH_SIZE,
            binarization=self.test_binarization,
            seed=self.seed,
        )
        self.vae.train()
        total = torch.tensor([sums.elbo, sums.count], dtype=torch.float64, device=self.device)
        all_reduce_sum(total)
        return (total[0] / total[1]).item()

    # -- the loop ----------------------------------------------------------------------------
    def fit(
        self,
        on_log: Callable[[dict], None],
        on_checkpoint: Callable[[dict, dict], None],
        steps: Optional["StepRunner"] = None,
    ) -> dict:
        """Train to the configured length: the one epoch/step loop, whichever step runs (`steps`: the eager step, or
        the captured CUDA graph where `train.cuda_graph` applies). On every rank: `on_log(row)` after each log interval,
        `on_checkpoint(state_dict, row)` at checkpoint steps, at the end and at a stop's step (fit returns there,
        `stop_requested` set)."""
        steps = steps or (CapturedSteps(self) if self.graphed else EagerSteps(self))
        s = self.state
        if s.step == 0 and self.bias_from_data_mean:  # a new run, not a resumed one
            self.data_mean = self.data_mean or mean_intensity(self.source.data).tolist()
            self.vae.set_output_bias_to_data_mean(torch.tensor(self.data_mean, dtype=torch.float64))
        window = self._new_window()
        row: dict = {}
        while True:
            self._begin_epoch()
            if self._finished():
                break
            for elbo, count in steps.epoch(s.epoch, s.batch_in_epoch):
                s.step, s.batch_in_epoch, s.samples_seen = s.step + 1, s.batch_in_epoch + 1, s.samples_seen + count
                window["count"] += count
                if elbo is not None and count:
                    window["elbo"] += elbo
                if self._wants_log():
                    steps.read_window(window)
                row = self._after_step(window, on_log, on_checkpoint) or row
                if self._finished():
                    break
        return row

    def _graph_serves(self) -> bool:
        """Whether the graph runs (train.cuda_graph): by the config check's rule; if not, the eager step, said once."""
        why = captured_step_cannot_serve(self.train_cfg, self.optim_cfg, streamed=self.source.device_data is None)
        if why is not None and self.rank == 0:
            say(f"train.cuda_graph: the eager step runs: {why}")
        return why is None

    def _finished(self) -> bool:
        """The loop ends here: the configured length is reached, or a rank asked to stop after this step."""
        return self.state.step >= self.total_steps or self.stop_requested

    @staticmethod
    def _new_window() -> dict:
        return {"elbo": 0.0, "count": 0, "start": time.perf_counter()}

    def _begin_epoch(self) -> None:
        """Before an epoch's batches (and once after the last step): move on to the next epoch when this one's
        are done, and set the learning rate of the epoch that runs (optim.lr_schedule)."""
        s = self.state
        if s.step > 0 and s.batch_in_epoch >= self.source.num_batches(s.epoch):
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
        set_learning_rate(self.optimizer, learning_rate(self.optim_cfg.lr, self.optim_cfg.lr_schedule, s.epoch))

    def _after_step(self, window: dict, on_log, on_checkpoint) -> dict:
        """Log (with the test set's ELBO where due) and checkpoint when the step just taken calls for it;
        returns the logged row, if any."""
        s = self.state
        row: dict = {}
        if self._wants_log():
            row = self._log_row(window, test_elbo=self._test_elbo_if_due())
            on_log(row)
            window.update(self._new_window())
        if s.step % self.checkpoint_cfg.every_steps == 0 or self._finished():
            self._check_parameters_finite()
            on_checkpoint(self.state_dict(), row)
        return row

    def _wants_log(self) -> bool:
        """Whether the step just taken ends a log interval. Step 1 is always logged: the user sees the
        first step at once, and the driver sees that training has begun (a signal before it stops at once)."""
        s = self.state
        return s.step % self.train_cfg.log_every_steps == 0 or s.step == 1 or self._finished()

    def _test_elbo_if_due(self) -> float:
        """The test set's ELBO at train.eval_every_steps and at the last step (NaN elsewhere, or without a
        test set). A stop is not the end: no test-set pass before its checkpoint."""
        t, s = self.train_cfg, self.state
        last = s.step >= self.total_steps
        if self.test_data is not None and (last or (t.eval_every_steps and s.step % t.eval_every_steps == 0)):
            return self.evaluate(self.test_data)
        return math.nan

    def _log_row(self, window: dict, test_elbo: float) -> dict:
        """metrics.csv's row for the log interval `window` ends; the optimized objective's sum starts anew."""
        s = self.state
        now = time.perf_counter()
        row = {
            "step": s.step,
            "epoch": s.epoch,
            "samples_seen": s.samples_seen,
            "train_elbo": window["elbo"] / window["count"] if window["count"] else math.nan,
            "test_elbo": test_elbo,
            "skipped_steps": s.skipped_steps,
            "samples_per_s": window["count"] / max(now - window["start"], 1e-9),
            "time": time.time(),
            "num_workers": self.world_size,
            "train_objective": self.objective_in_window / window["count"]
            if self.weighs_kl and window["count"]
            else math.nan,
            "learning_rate": self.optimizer.param_groups[0]["lr"],
        }
        self.objective_in_window = 0.0
        return row
