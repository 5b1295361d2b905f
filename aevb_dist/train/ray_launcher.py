"""Launching the workers on Ray: a TorchTrainer on the embedded Ray or a cluster (`ray.address`).

Ray Train places the workers, joins them into a gloo (NCCL with GPUs) group and restarts the
group up to `train.max_failures` times. Checkpoints do not go through Ray Train: rank 0 writes
them into the run folder itself, retried through storage outages (`run_folder_sink`), and a
restarted group resumes from the newest verified one there.

Preemption: Ray Train's watcher marks every worker when a node of the group is being drained for
preemption (a spot reclaim; `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`). The workers then
checkpoint the next step and wait for the reclaim: Ray Train restarts the group at the deadline, on the
nodes that remain (elastic) or when a replacement joins, from that checkpoint, so no step is lost.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
import time
from typing import Optional

from aevb_dist.cluster import compat
from aevb_dist.cluster.ray_runtime import cluster_cpus, head_answers, start_ray, stop_ray, threads_for_cpus
from aevb_dist.config.schema import Config
from aevb_dist.console import first_line, say, user_error_in
from aevb_dist.run import checkpoint, storage
from aevb_dist.train.collectives import peer_lost_in
from aevb_dist.train.run_folder_sink import WriteThenReport
from aevb_dist.train.worker import WorkerContext, WorkerSpec, run_worker

# How often an elastic run looks for room to grow back (Ray's default is 60 s); growing is a restart.
ELASTIC_CHECK_S = 10.0
# How long past a preemption deadline a checkpointed worker waits for Ray Train to restart the group
# (its controller does so at the deadline, or 120 s after the notice when the notice has none).
RECLAIM_WAIT_S = 300.0


def train_on_ray(spec: WorkerSpec) -> None:
    """The training function of each Ray Train worker: the worker, with checkpoints written into the run
    folder by rank 0 (retried through storage outages, in the background) and metrics reported to Ray."""
    cfg = spec.config
    sink = WriteThenReport(spec.run, cfg.checkpoint.keep_last, cfg.run.storage_retry_s)
    notice = PreemptionNotice()
    stopped = run_worker(spec, sink, from_ray_train(cfg.train.use_gpu), preemption_notice=notice)
    sink.wait()  # the last checkpoint is in the run folder before the worker reports success
    if stopped == "preempted":
        notice.wait_for_reclaim()


def from_ray_train(use_gpu: bool) -> WorkerContext:
    """This worker's `WorkerContext` from Ray Train's: its rank and world size, and the GPU Ray Train made
    torch's current one."""
    import ray.train
    import torch

    context = ray.train.get_context()
    device = f"cuda:{torch.cuda.current_device()}" if use_gpu else "cpu"
    return WorkerContext(rank=context.get_world_rank(), world_size=context.get_world_size(), device=device)


class PreemptionNotice:
    """Whether Ray Train's preemption watcher has marked this worker: read from the worker's own context at
    every step. (`ray.train.get_preemption_info()` is a barrier through Ray's actors at each call; our ranks
    agree through the step's all-reduce instead, `collectives.STOP_VOTES`.) An internal attribute of
    Ray Train 2.60: where it is missing, no notice is ever seen and a preemption costs the steps since
    the last checkpoint, as a node failure does."""

    def __init__(self):
        self._context = compat.preemption_context()

    def info(self):
        return getattr(self._context, "preemption_info", None)

    def __call__(self) -> bool:
        return self.info() is not None

    def wait_for_reclaim(self) -> None:
        """Returning now would end the run as finished: wait until Ray Train restarts the group."""
        deadline_ms = getattr(self.info(), "deadline_ms", None)
        until = max(time.time(), (deadline_ms or 0) / 1000) + RECLAIM_WAIT_S
        while time.time() < until:
            time.sleep(1.0)
        raise RuntimeError(
            f"a preemption notice stopped training, but Ray Train did not restart the group "
            f"within {RECLAIM_WAIT_S:g} s of its deadline"
        )


def launch_on_ray(spec: WorkerSpec, num_examples: int) -> None:
    """Run the workers `spec` describes to the end, each with its share of the CPUs in torch threads; raises a
    one-line ValueError for a user's mistake."""
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, run = spec.config, spec.run
    started = start_ray(cfg.ray.address, cfg.ray.show_worker_logs)
    try:
        cpus = _cpus_per_worker(cfg)
        _check_the_group_fits(cfg, cpus)
        spec = dataclasses.replace(spec, threads=threads_for_cpus(cpus))
        workers = (
            f"{cfg.train.min_workers}–{cfg.train.num_workers} (elastic)"
            if cfg.train.min_workers
            else str(cfg.train.num_workers)
        )
        say(
            f"training {cfg.run.name}: {workers} worker(s) × {_worker_resources(cfg, cpus)}, "
            f"{spec.threads} thread(s) each, {num_examples:,} training examples → {run.uri}"
        )
        storage_path, storage_fs = storage.ray_train_storage(run)
        trainer = TorchTrainer(
            functools.partial(train_on_ray, spec),
            torch_config=TorchConfig(backend=_collectives_backend(cfg), timeout_s=300),
            scaling_config=_scaling(cfg, cpus),
            run_config=RunConfig(
                name=cfg.run.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                # a preemption restarts the group however often it happens
                failure_config=FailureConfig(max_failures=cfg.train.max_failures, max_preemption_failures=-1),
            ),
        )
        try:
            _fit_off_the_main_thread(trainer, _HeadWatch(cfg, run) if not started else None)
        except ray.train.TrainingFailedError as err:
            told = _told(err, cfg, run)
            raise told from (err if told is not err else None)
        except ray.exceptions.RayError as err:  # Ray's own machinery failed (a node, the head, an actor)
            if not started and not head_answers():
                raise _head_lost(cfg, run, "during the run") from None
            raise _ray_failed(f"{type(err).__name__}: {first_line(err)}", run) from err
    finally:
        stop_ray(started)


class _HeadWatch:
    """Whether the cluster's head still answers, asked every `every_s`: a head gone for `lost_after_s` ends
    the run in one line (Ray's driver would wait out its own reconnect timeout, then die in a C++ log)."""

    every_s, lost_after_s = 5.0, 15.0

    def __init__(self, cfg: Config, run: storage.Folder):
        self.cfg, self.run = cfg, run
        self.last_answer = self.last_asked = time.monotonic()

    def check(self) -> None:
        now = time.monotonic()
        if now - self.last_asked < self.every_s:
            return
        self.last_asked = now
        if head_answers():
            self.last_answer = now
        elif now - self.last_answer >= self.lost_after_s:
            raise _head_lost(self.cfg, self.run, f"{now - self.last_answer:.0f} s ago")


def _head_lost(cfg: Config, run: storage.Folder, when: str) -> ValueError:
    return ValueError(
        f"the Ray cluster's head at {cfg.ray.address or os.environ.get('RAY_ADDRESS') or 'its address'} stopped "
        f"answering {when}; {run.uri} keeps its newest complete checkpoint: run the same command "
        "again once the cluster is back"
    )


def _fit_off_the_main_thread(trainer, head_watch: Optional[_HeadWatch] = None) -> None:
    """TorchTrainer.fit() called from the main thread takes SIGINT over (Ctrl-C aborts the run, losing the
    steps since the last checkpoint); from another thread it leaves the driver's handler in place
    (stop_request: a checkpoint at the next step). The main thread waits, and takes the signals, and
    watches the cluster's head."""
    failed: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - raised again on the main thread
            failed.append(err)

    runner = threading.Thread(target=fit, name="aevb-ray-train-fit", daemon=True)
    runner.start()
    while runner.is_alive():
        runner.join(0.2)
        if head_watch is not None:
            head_watch.check()
    if failed:
        raise failed[0]


def _scaling(cfg: Config, cpus: float):
    """Fixed, or elastic between train.min_workers and train.num_workers (Ray Train V2's resizing)."""
    from ray.train import ScalingConfig

    t = cfg.train
    resources = {"CPU": cpus, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    if t.min_workers is None:
        return ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources)
    return ScalingConfig(
        num_workers=(t.min_workers, t.num_workers),
        use_gpu=t.use_gpu,
        resources_per_worker=resources,
        elastic_resize_monitor_interval_s=ELASTIC_CHECK_S,
    )


def _check_the_group_fits(cfg: Config, cpus: float) -> None:
    """A worker group that the cluster's nodes cannot hold is refused in one line: Ray Train would wait for
    it forever. Where an autoscaler may add nodes, Ray Train checks against what it may bring up instead."""
    import ray

    if compat.over_ray_client():  # the cluster's state is asked on the cluster
        autoscaled, nodes = ray.get(ray.remote(num_cpus=0)(_the_nodes_alive).remote())
    else:
        autoscaled, nodes = _the_nodes_alive()
    if autoscaled:
        return
    per_node = [math.floor(r.get("CPU", 0) / cpus + 1e-9) if cpus > 0 else math.inf for r in nodes]
    if cfg.train.use_gpu:
        share = cfg.train.gpus_per_worker
        per_node = [min(n, math.floor(r.get("GPU", 0) / share + 1e-9)) for n, r in zip(per_node, nodes)]
    room, needed = sum(per_node), cfg.train.min_workers or cfg.train.num_workers
    if room >= needed:
        return
    key = "train.min_workers" if cfg.train.min_workers else "train.num_workers"
    worker = _worker_resources(cfg, cpus)
    have = f"{sum(r.get('CPU', 0) for r in nodes):g} CPUs, {sum(r.get('GPU', 0) for r in nodes):g} GPUs"
    raise ValueError(
        f"the Ray cluster has room for {room} worker(s) of {worker} ({len(nodes)} node(s), {have}), "
        f"and {key}={needed} are needed: add nodes, lower {key}, or lower train.cpus_per_worker"
    )


def _collectives_backend(cfg: Config) -> str:
    """NCCL for a GPU of one's own; gloo on CPUs and for ranks sharing a GPU (NCCL: "Duplicate GPU detected")."""
    return "nccl" if cfg.train.use_gpu and cfg.train.gpus_per_worker == 1 else "gloo"


def _worker_resources(cfg: Config, cpus: float) -> str:
    return f"{cpus:g} CPU" + (f" and {cfg.train.gpus_per_worker:g} GPU" if cfg.train.use_gpu else "")


def _the_nodes_alive() -> tuple[bool, list[dict]]:
    """(whether an autoscaler may add nodes, the resources of each node alive now)."""
    import ray

    return bool(compat.autoscaler_max_resources()), [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _cpus_per_worker(cfg: Config) -> float:
    if cfg.train.cpus_per_worker is not None:
        return cfg.train.cpus_per_worker
    # Our reader runs inside each worker (no Ray Data tasks), so workers may share all CPUs.
    return max(cluster_cpus() / cfg.train.num_workers if not cfg.ray.address else 1.0, 0.01)


def _told(err: Exception, cfg: Config, run: storage.Folder) -> Exception:
    """A failed run as the user is told it: a one-line ValueError where the cause is the user's to fix, or Ray's
    machinery (a worker's actor or node lost); else `err` itself, an error in aevb_dist's own code, whose
    traceback is for a bug report."""
    failures = getattr(err, "worker_failures", None) or {}
    causes = list(failures.values()) or [getattr(err, "controller_failure", err)]
    for cause in causes:
        found = user_error_in(cause)
        if found is not None:
            return found
    # A worker lost mid-step fails twice: its actor dies (Ray's machinery), and each surviving rank's collective
    # fails as its peer's connection goes. Ray Train may report either first, or both.
    dead = [compat.ray_train_machinery_failure(cause) for cause in causes]
    peers_lost = [peer_lost_in(cause) for cause in causes]
    if not all(d is not None or p is not None for d, p in zip(dead, peers_lost)):
        return err
    more = "" if cfg.train.max_failures else "; train.max_failures > 0 lets Ray Train restart them"
    dead = [d for d in dead if d is not None]
    if dead:
        reason = next((line for line in str(dead[0]).splitlines() if "died because" in line), first_line(dead[0]))
        return _ray_failed(f"lost {len(dead)} training worker(s): {reason.strip().rstrip('.')}{more}", run)
    words = next(p for p in peers_lost if p is not None)
    return _ray_failed(f"lost a training worker: its peers' collective failed with '{words}'{more}", run)


def _ray_failed(why: str, run: storage.Folder) -> ValueError:
    return ValueError(f"Ray failed during the run ({why}); {_resume_point(run)} (--debug shows Ray's traceback)")


def _resume_point(run: storage.Folder) -> str:
    """Where a rerun of the same command starts: the run folder's newest complete checkpoint, named."""
    try:
        newest = checkpoint.latest(run.fs, run.path)
    except Exception:  # noqa: BLE001 - storage unreachable as well: said without the name
        return f"{run.uri} keeps its newest complete checkpoint: run the same command again to resume"
    if newest is None:
        return f"{run.uri} holds no checkpoint yet: run the same command again to start the run anew"
    name = newest.rstrip("/").rsplit("/", 1)[-1]
    return f"{run.uri} keeps its newest complete checkpoint, {name}: run the same command again to resume from it"
