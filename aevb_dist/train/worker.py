"""One data-parallel worker: the same function under every launcher.

The driver decides what every worker is handed (a typed `WorkerSpec`: the config, the run folder, the training set
as it found it); a launcher sets the spec's threads from the CPUs it gives each worker and hands `run_worker` the
spec, a checkpoint sink and a `WorkerContext` (rank, world size, device), with the process group joined where there
are several workers: Ray Train does so on a Ray cluster (`ray_launcher.from_ray_train`), local mode's supervisor in
its own processes (`local_launcher`), and one process needs none. The worker never asks which launcher started it.
It resumes from the newest checkpoint in the run folder whose manifest verifies (so an upload cut off part way is
skipped in favour of the last good one), trains, writes metrics.csv on rank 0 (and sends its rows to MLflow where
`tracking.mlflow_uri` is set: tracking/mlflow_run.py), and gives each checkpoint to the sink. Where a checkpoint
goes is the sink's business, never the worker's.

It stops early, after the checkpoint of the step where it stopped, when a rank asks to: rank 0 when the driver
asked (Ctrl-C / SIGTERM: `stop_request`), any rank when the launcher's `preemption_notice` says so.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from aevb_dist.config import to_dict
from aevb_dist.config.schema import Config
from aevb_dist.console import say
from aevb_dist.data.binarization import eval_binarization
from aevb_dist.model.hierarchical import model_from_config
from aevb_dist.model.networks import autocast_networks
from aevb_dist.run import checkpoint, scratch, storage, uri
from aevb_dist.run.lease import record_writer
from aevb_dist.run.metrics import RunLog
from aevb_dist.train.datasets import rank_data, with_covariate_sizes
from aevb_dist.train.optimizers import build_optimizer, examples_per_step
from aevb_dist.train.stop_request import StopRequestWatch
from aevb_dist.train.trainer import Trainer


@dataclass(frozen=True)
class WorkerSpec:
    config: Config  # validated, with local paths made absolute by the driver
    run: storage.Folder  # the run folder, resolved once on the driver
    # torch threads of each worker (ray_runtime.threads_for_cpus of its CPUs): set by the launcher, which gives
    # the workers their CPUs
    threads: Optional[int]
    # The training set as the driver found it (ParquetDataset.describe): workers open it without reading
    # its index or footers, O(1) storage requests per worker whatever the number of shards.
    train_description: Optional[dict] = None
    # model.output_bias_init=data_mean: the training set's mean pixel, computed once by the driver for a new run.
    data_mean: Optional[list[float]] = None
    # A sweep's trial: the sweep's MLflow run, parent of this run's (tracking.mlflow_uri).
    mlflow_parent_run_id: Optional[str] = None


@dataclass(frozen=True)
class WorkerContext:
    """Who this worker is, filled in by its launcher (from Ray Train's context on Ray; by local mode's
    supervisor; by hand in one process)."""

    rank: int
    world_size: int
    device: str  # "cpu", or "cuda:N": the GPU the launcher gave this worker


class CheckpointSink(Protocol):
    def __call__(self, folder: Optional[str], name: str, metrics: dict) -> None:
        """Called by every rank at the same steps (Ray Train's report is a barrier). On rank 0 `folder`
        is a local folder holding the checkpoint `name`, written by `checkpoint.save` and removed when the
        call returns (a sink that uploads later copies it first); None elsewhere."""


def run_worker(
    spec: WorkerSpec,
    sink: CheckpointSink,
    context: WorkerContext,
    preemption_notice: Callable[[], bool] = lambda: False,
) -> Optional[str]:
    """Train to the end (returns None), or stop early after a checkpoint: returns "preempted" when this rank
    got a preemption notice, "requested" when the driver asked (then the sink may still be uploading)."""
    cfg = spec.config
    torch.set_num_threads(spec.threads)
    rank, world_size, device = context.rank, context.world_size, context.device
    run = spec.run
    watch: Optional[StopRequestWatch] = None  # rank 0's, started with the loop (the probe reads it then)
    if rank == 0:  # the one process that writes into the run folder
        record_writer(run)
    newest = checkpoint.latest(run.fs, run.path)
    trainer = trainer_for_config(
        cfg,
        rank=rank,
        world_size=world_size,
        device=device,
        train_description=spec.train_description,
        data_mean=spec.data_mean,
        stop_probe=lambda: preemption_notice() or (watch is not None and watch.requested),
        saved=None if newest is None else checkpoint.load(run.fs, newest, map_location=device),
    )
    if trainer.resume_note and rank == 0:
        say(f"warning: {trainer.resume_note}")
    log = RunLog(run, resume_step=trainer.state.step, retry_s=cfg.run.storage_retry_s) if rank == 0 else None
    tracked = _mlflow_run(spec) if rank == 0 else None
    watch = StopRequestWatch(run) if rank == 0 else None
    try:
        trainer.fit(
            on_log=_rank0_log(log, tracked),
            on_checkpoint=lambda state, row: save_checkpoint(cfg, rank, state, row, log, sink),
        )
    except BaseException:
        if tracked is not None:
            tracked.finish("FAILED")
        raise
    finally:
        if watch is not None:
            watch.close()
    if log is not None:
        log.close()
    stopped = None if not trainer.stop_requested else "preempted" if preemption_notice() else "requested"
    if tracked is not None:  # a preempted run goes on after the reclaim: its MLflow run stays RUNNING
        status = {None: "FINISHED", "requested": "KILLED", "preempted": None}[stopped]
        tracked.finish(status, checkpoint_uri=uri.join(run.uri, checkpoint.checkpoint_name(trainer.state.step)))
    return stopped


def _mlflow_run(spec: WorkerSpec):
    """Rank 0's MLflow sender where tracking.mlflow_uri is set (tracking/mlflow_run.py)."""
    t = spec.config.tracking
    if t.mlflow_uri is None:
        return None
    from aevb_dist.tracking.mlflow_run import MlflowRun, tracked_run

    return MlflowRun(tracked_run(t, spec.run, to_dict(spec.config), spec.mlflow_parent_run_id))


def _rank0_log(log: Optional[RunLog], tracked) -> Callable[[dict], None]:
    """Each metrics row into metrics.csv (and TensorBoard), then queued for MLflow."""
    if log is None:
        return lambda row: None
    if tracked is None:
        return log.append

    def both(row: dict) -> None:
        log.append(row)
        tracked.log_row(row)

    return both


def trainer_for_config(
    cfg: Config,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: str = "cpu",
    train_description: Optional[dict] = None,
    stop_probe: Callable[[], bool] = lambda: False,
    data_mean: Optional[list[float]] = None,
    saved: Optional[dict] = None,
) -> Trainer:
    """Rank `rank` of `world_size`'s trainer as the config says: its batches and test set (the training set
    from `train_description`, the driver's, where given), the model and the optimizer; resumed from the
    checkpoint state `saved` where given."""
    source, test_data = rank_data(
        cfg, rank=rank, world_size=world_size, device=torch.device(device), train_description=train_description
    )
    cfg = dataclasses.replace(cfg, model=with_covariate_sizes(cfg.model, source.data))
    # Initial parameters from the seed: identical on every rank. No input checks in the step:
    # ParquetDataset checked every row group (range, NaN/inf) already.
    vae = model_from_config(cfg.model, seed=cfg.seed, validate_inputs=False).to(source.device)
    if cfg.train.autocast == "bfloat16":
        autocast_networks(vae, source.device)
    # On a GPU the eager and the captured step use the same (fused) Adam: the same update arithmetic.
    on_gpu, examples = source.device.type == "cuda", examples_per_step(cfg.train, world_size)
    optimizer = build_optimizer(
        vae.parameters(), cfg.optim.name, cfg.optim.lr, on_gpu=on_gpu, eps=cfg.optim.eps, examples_per_step=examples
    )
    return Trainer(
        vae,
        optimizer,
        source,
        test_data,
        train_cfg=cfg.train,
        optim_cfg=cfg.optim,
        checkpoint_cfg=cfg.checkpoint,
        seed=cfg.seed,
        test_binarization=eval_binarization(cfg.model.likelihood, cfg.data.binarization),
        bias_from_data_mean=cfg.model.output_bias_init == "data_mean",
        stop_probe=stop_probe,
        data_mean=data_mean,
        saved=saved,
    )


def save_checkpoint(
    cfg: Config, rank: int, state: dict, row: dict, log: Optional[RunLog], sink: CheckpointSink
) -> None:
    """Every rank calls the sink with the same name and metrics; only rank 0 writes (the checkpoint into
    a local folder for the sink, then the metrics it holds back)."""
    step = state["state"]["step"]
    metrics = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))} or {"step": step}
    name = checkpoint.checkpoint_name(step)
    if rank != 0:
        sink(None, name, metrics)
        return
    staging = tempfile.gettempdir()  # holds the checkpoint, and the sink's copy of it
    needs = 2 * checkpoint.state_nbytes(state)
    with storage.unwritable_told(f"the local staging folder {staging} (TMPDIR)", name, needs, folder=staging):
        with scratch.folder("ckpt") as folder:
            checkpoint.save(folder, state, to_dict(cfg))
            sink(folder, name, metrics)
    log.flush()
