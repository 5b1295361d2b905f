"""The data-parallel training loop. No Ray here: the worker (worker.py) passes in the callables.

Gradients are reduced as sums: every rank backpropagates −(Σ of its examples' objective),
one all-reduce adds gradients, ELBO sums and example counts across ranks, and the
gradient is divided once by the global count. That is exactly the gradient of the
global minibatch mean (eq. 8 / N) even when ranks hold different numbers of examples,
including none at the end of an epoch, where a DDP mean of means would be wrong.

Noise ε is drawn from a generator seeded by (seed, step, rank), so the random state is a
function of the step: a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from aevb_dist import names
from aevb_dist.config import Config
from aevb_dist.data.binarization import eval_binarization, train_binarization
from aevb_dist.data.reader import EpochStream, ParquetDataset
from aevb_dist.data.schema import Batch
from aevb_dist.model.elbo import map_objective_sum, per_example_bound
from aevb_dist.model.vae import VAE


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


OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
names.require_registry("optimizer", names.OPTIMIZERS, OPTIMIZERS)


def build_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is not one of: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    return gen


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(buffer: torch.Tensor) -> torch.Tensor:
    if distributed():
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer


def all_reduce_step_sums(flat: torch.Tensor, grad_dtype: Optional[torch.dtype]) -> None:
    """Sum [gradients..., ELBO sum, count] across ranks in place. With `grad_dtype` (bfloat16) the
    gradients travel compressed, in one all-reduce, and the two scalars in float64, so counts stay exact."""
    if grad_dtype is None or not distributed():
        all_reduce_sum(flat)
        return
    grads = flat[:-2].to(grad_dtype)
    scalars = flat[-2:].double()
    dist.all_reduce(grads, op=dist.ReduceOp.SUM)
    dist.all_reduce(scalars, op=dist.ReduceOp.SUM)
    flat[:-2].copy_(grads)
    flat[-2:].copy_(scalars)


def open_datasets(cfg: Config) -> tuple[ParquetDataset, Optional[ParquetDataset]]:
    endpoint = cfg.run.s3_endpoint_url
    if not cfg.data.train_uri:
        raise ValueError("data.train_uri is empty; point it at a dataset made by `aevb-dist prepare`")
    train = ParquetDataset(cfg.data.train_uri, expected_dim=cfg.model.input_dim, endpoint_url=endpoint)
    test = ParquetDataset(cfg.data.test_uri, expected_dim=cfg.model.input_dim, endpoint_url=endpoint) \
        if cfg.data.test_uri else None
    return train, test


def epoch_num_batches(data: ParquetDataset, cfg: Config, world_size: int, epoch: int) -> int:
    return EpochStream(data, rank=0, world_size=world_size, batch_size=cfg.train.batch_size_per_worker,
                       epoch=epoch, seed=cfg.seed, shuffle=cfg.data.shuffle).num_batches


def total_steps(data: ParquetDataset, cfg: Config, world_size: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    epochs = cfg.train.num_epochs or 1
    return sum(epoch_num_batches(data, cfg, world_size, e) for e in range(epochs))


class Trainer:
    """One rank's view of data-parallel training."""

    def __init__(self, cfg: Config, *, rank: int = 0, world_size: int = 1, device: str = "cpu"):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.train_data, self.test_data = open_datasets(cfg)
        # Initial parameters from the seed: identical on every rank. No input checks in the step:
        # ParquetDataset checked every row group (range, NaN/inf) already.
        self.vae = VAE.from_config(cfg.model, seed=cfg.seed, validate_inputs=False).to(self.device)
        self.optimizer = build_optimizer(self.vae.parameters(), cfg.optim.name, cfg.optim.lr)
        self.params = list(self.vae.parameters())
        # One flat buffer holds every gradient (as views), then the ELBO sum and the example count:
        # backward accumulates straight into it and a single in-place all-reduce sums it, with no
        # per-step copies (what DDP calls gradient_as_bucket_view).
        self._flat = torch.zeros(sum(p.numel() for p in self.params) + 2, device=self.device)
        offset = 0
        for p in self.params:
            p.grad = self._flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self._grad_comm_dtype = torch.bfloat16 if cfg.train.allreduce_dtype == "bfloat16" else None
        self.state = TrainState(world_size=world_size)
        self.total_steps = total_steps(self.train_data, cfg, world_size)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "state": dataclasses.asdict(self.state), "image_shape": list(self.train_data.shape)}

    def load_state_dict(self, saved: dict) -> Optional[str]:
        """Restore everything; returns a warning when the data position cannot carry over."""
        try:
            self.vae.load_state_dict(saved["model"])
        except RuntimeError as err:
            raise ValueError("the checkpoint holds a model of a different shape than model.* in the config: "
                             + str(err).splitlines()[1 if len(str(err).splitlines()) > 1 else 0].strip()) from None
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = TrainState(**saved["state"])
        if self.state.world_size != self.world_size:
            old = self.state.world_size
            self.state.batch_in_epoch, self.state.world_size = 0, self.world_size
            return (f"resuming with {self.world_size} workers instead of {old}: row groups are dealt anew, "
                    f"so epoch {self.state.epoch} restarts from its beginning")
        return None

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> tuple[float, int]:
        """One synchronous update; returns the global (ELBO sum, example count) of the step."""
        t = self.cfg.train
        x = torch.from_numpy(batch.x).to(self.device, non_blocking=True)
        count = x.shape[0]
        flat = self._flat
        flat.zero_()  # an empty batch contributes zero gradients, a zero ELBO sum and a zero count
        if count:
            gen = step_generator(self.cfg.seed, self.state.step, self.rank, self.device)
            elbo_sum = per_example_bound(self.vae, x, t.estimator, t.num_latent_samples, generator=gen).sum()
            objective = map_objective_sum(elbo_sum, self.vae, t.theta_prior_std, count, self.train_data.num_rows)
            loss = -objective
            loss.backward()
            flat[-2] = elbo_sum.detach()
            flat[-1] = count
        all_reduce_step_sums(flat, self._grad_comm_dtype)
        global_elbo, global_count = flat[-2:].tolist()
        grad_flat = flat[:-2]
        # One reduction: a NaN or inf anywhere makes the sum non-finite.
        if not (math.isfinite(global_elbo) and math.isfinite(grad_flat.sum().item())):
            return self._nonfinite(batch, global_elbo)
        grad_flat.div_(global_count)
        self.optimizer.step()
        return global_elbo, int(global_count)

    def _nonfinite(self, batch: Batch, elbo: float) -> tuple[float, int]:
        where = (f"step {self.state.step} (epoch {self.state.epoch}, batch {self.state.batch_in_epoch}, "
                 f"rank {self.rank} example indices {batch.index[:3].tolist()}...)")
        if self.cfg.train.on_nonfinite == "error":
            raise NonFiniteError(f"non-finite objective or gradient at {where}: ELBO sum {elbo}; "
                                 "lower optim.lr or set train.on_nonfinite=skip")
        self.state.skipped_steps += 1
        return math.nan, 0

    def _check_parameters_finite(self) -> None:
        """Never write a corrupted checkpoint: parameters that went non-finite stop the run here."""
        if not all(torch.isfinite(p).all() for p in self.params):
            raise NonFiniteError(f"model parameters became non-finite by step {self.state.step}; not saving a "
                                 "corrupted checkpoint (the last good one stays the one a resume uses). "
                                 "Lower optim.lr")

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: ParquetDataset, estimator: str = "B", num_samples: int = 1) -> float:
        """Dataset mean of the bound: this rank's row groups, sums and counts all-reduced, divided once."""
        binarization = eval_binarization(self.cfg.model.likelihood, self.cfg.data.binarization)
        stream = EpochStream(data, rank=self.rank, world_size=self.world_size, batch_size=1000, epoch=0,
                             seed=self.cfg.seed, shuffle=False, binarization=binarization)
        gen = step_generator(self.cfg.seed + 1, 0, self.rank, self.device)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in stream:
            if len(batch):
                x = torch.from_numpy(batch.x).to(self.device)
                total[0] += per_example_bound(self.vae, x, estimator, num_samples, generator=gen).sum().double()
                total[1] += len(batch)
        all_reduce_sum(total)
        return (total[0] / total[1]).item()

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, on_log: Callable[[dict], None], on_checkpoint: Callable[[dict, dict], None]) -> dict:
        """Train to the configured length. `on_log(row)` after each log interval (every rank);
        `on_checkpoint(state_dict, row)` at checkpoint steps and at the end (every rank, same steps)."""
        t, s = self.cfg.train, self.state
        window = {"elbo": 0.0, "count": 0, "start": time.perf_counter(), "steps": 0}
        row: dict = {}
        while s.step < self.total_steps:
            if s.step > 0 and s.batch_in_epoch >= epoch_num_batches(self.train_data, self.cfg, self.world_size, s.epoch):
                s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            stream = EpochStream(self.train_data, rank=self.rank, world_size=self.world_size,
                                 batch_size=t.batch_size_per_worker, epoch=s.epoch, seed=self.cfg.seed,
                                 shuffle=self.cfg.data.shuffle, window=self.cfg.data.shuffle_window_row_groups,
                                 binarization=train_binarization(self.cfg.model.likelihood, self.cfg.data.binarization),
                                 start_batch=s.batch_in_epoch)
            for batch in stream:
                elbo, count = self.train_step(batch)
                s.step, s.batch_in_epoch, s.samples_seen = s.step + 1, s.batch_in_epoch + 1, s.samples_seen + count
                if count:
                    window["elbo"] += elbo
                    window["count"] += count
                window["steps"] += 1
                row = self._maybe_log(window, on_log)
                if s.step % self.cfg.checkpoint.every_steps == 0 or s.step >= self.total_steps:
                    self._check_parameters_finite()
                    on_checkpoint(self.state_dict(), row)
                if s.step >= self.total_steps:
                    break
            if s.batch_in_epoch >= stream.num_batches:
                s.epoch, s.batch_in_epoch = s.epoch + 1, 0
        return row

    def _maybe_log(self, window: dict, on_log: Callable[[dict], None]) -> dict:
        t, s = self.cfg.train, self.state
        last = s.step >= self.total_steps
        # Step 1 is always logged: the user sees the first step at once, and benchmarks time it.
        if s.step % t.log_every_steps and not last and s.step != 1:
            return {}
        now = time.perf_counter()
        test_elbo = math.nan
        if self.test_data is not None and (last or (t.eval_every_steps and s.step % t.eval_every_steps == 0)):
            test_elbo = self.evaluate(self.test_data)
        row = {"step": s.step, "epoch": s.epoch, "samples_seen": s.samples_seen,
               "train_elbo": window["elbo"] / window["count"] if window["count"] else math.nan,
               "test_elbo": test_elbo, "skipped_steps": s.skipped_steps,
               "samples_per_s": window["count"] / max(now - window["start"], 1e-9), "time": time.time()}
        on_log(row)
        window.update(elbo=0.0, count=0, start=time.perf_counter(), steps=0)
        return row
