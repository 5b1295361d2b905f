"""`ray.local_mode=true`: Ray Train's local mode on processes of this machine, with no Ray cluster.

Why it exists: on the embedded Ray, Ray Train V2 starts a controller and six helper actors, each a
fresh Python process importing Ray Train (~21 CPU-seconds in all, measured: 12-14 s to the first
step on 2 cores). In local mode (`ScalingConfig(num_workers=0)`) Ray Train runs the training
function in the calling process and, when the torchrun variables are set, joins a torch process
group from them. Here torch.distributed's elastic launcher starts one process per worker with those
variables, forked from a server that has the heavy modules imported already, so a run starts in a
few seconds. The worker function is the same as on a cluster (`worker.run_worker`).

What Ray Train's controller did that local mode does not, is done here: a failed worker stops the
whole group (the elastic agent's job), which is launched again from the newest complete checkpoint,
up to `train.max_failures` times (`run_group`). Checkpoints go into the run folder as on Ray
(`run_folder_sink.WriteToRunFolder`: rank 0 writes them itself, manifest last, and prunes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import select
import signal
import tempfile
import threading
import time
import uuid

from aevb_dist.cluster import compat
from aevb_dist.cluster.ray_runtime import threads_for_cpus
from aevb_dist.console import first_line, say, user_error_in
from aevb_dist.run import storage
from aevb_dist.train.fork_server import prestart
from aevb_dist.train.ray_context import from_ray_train
from aevb_dist.train.run_folder_sink import WriteToRunFolder
from aevb_dist.train.worker import WorkerSpec, run_worker

_PROCESS_LOGGERS = ["torch.distributed.elastic.multiprocessing", "torch.multiprocessing"]


def launch_local(spec: WorkerSpec, num_examples: int) -> None:
    """Run the workers `spec` describes as processes of this machine to the end, each with its share of the
    CPUs in torch threads; raises ValueError for a user's mistake."""
    import torch

    cfg, run = spec.config, spec.run

    n = cfg.train.num_workers
    if cfg.train.use_gpu and torch.cuda.device_count() < n:
        raise ValueError(
            f"ray.local_mode=true with train.use_gpu=true needs a GPU per worker: "
            f"train.num_workers={n}, GPUs visible: {torch.cuda.device_count()}"
        )
    _forget_ray_checkpoint_list(run)
    cpus = cfg.train.cpus_per_worker if cfg.train.cpus_per_worker is not None else (os.cpu_count() or 1) // n
    spec = dataclasses.replace(spec, threads=threads_for_cpus(cpus))
    say(
        f"training {cfg.run.name} in Ray Train's local mode: {n} worker process(es), {spec.threads} thread(s) "
        f"each, {num_examples:,} training examples → {run.uri}"
    )
    run_group(spec, num_workers=n, max_failures=cfg.train.max_failures)


def _forget_ray_checkpoint_list(run: storage.Folder) -> None:
    """This launcher prunes checkpoints that an earlier run on Ray may have listed in its snapshot file;
    Ray Train refuses to resume a run whose snapshot names a missing checkpoint. Neither launcher
    resumes through Ray's list (the worker picks the newest verified folder), so the list is dropped.
    A later run on Ray then keeps `checkpoint.keep_last` of its own checkpoints and leaves older ones."""
    snapshot = run.file(compat.checkpoint_manager_snapshot_name())
    if run.fs.exists(snapshot):
        run.fs.rm(snapshot)


def _worker(spec: WorkerSpec, error_dir: str, driver_pid: int) -> None:
    """One worker process: Ray Train's local-mode TorchTrainer around the cluster worker function."""
    _die_with_driver(driver_pid)
    # Ctrl-C in a terminal reaches every process of the group; the driver answers it (stop_request.py).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = spec.config
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if not cfg.train.use_gpu:
        # Ray's local controller picks NCCL whenever CUDA is visible; CPU training needs gloo.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not cfg.ray.show_worker_logs:  # "Running in local mode", "Reported metrics" at every report
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    storage_path, storage_fs = storage.ray_train_storage(spec.run)
    sink = WriteToRunFolder(spec.run, cfg.checkpoint.keep_last, cfg.run.storage_retry_s)
    trainer = TorchTrainer(
        functools.partial(_train_in_local_mode, spec, sink),
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs),
    )
    try:
        trainer.fit()
        sink.wait()  # the last checkpoint, uploaded in the background, is in the run folder
    except BaseException as err:
        # The launcher only sees an exit code: leave it the cause in one line, and the user's mistake if any.
        user_error = user_error_in(err)
        with open(os.path.join(error_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(
                {
                    "user_error": None if user_error is None else str(user_error),
                    "reason": f"{type(err).__name__}: {first_line(err)}",
                },
                f,
            )
        raise


def _train_in_local_mode(spec: WorkerSpec, sink: WriteToRunFolder) -> None:
    """The training function Ray Train's local mode runs in each worker process: the worker, told who it is."""
    run_worker(spec, sink, from_ray_train(spec.config.train.use_gpu))


def _die_with_driver(pid: int) -> None:
    """A worker's parent is the fork server, which lives as long as any worker does; so each worker
    watches the command itself and exits the moment it is gone (even SIGKILLed): no orphan goes on
    writing into the run folder. A checkpoint cut off this way has no manifest, so it is never used."""

    def watch() -> None:
        try:
            with open(os.pidfd_open(pid), "rb") as handle:  # readable once the process has exited
                select.select([handle], [], [])
        except (AttributeError, OSError):  # no pidfd (old kernel): poll instead
            while _alive(pid):
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="aevb-watch-driver", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return True


def run_group(spec: WorkerSpec, num_workers: int, max_failures: int) -> None:
    """Run `num_workers` local-mode workers to the end; raises ValueError for a user's mistake.

    A failed attempt is relaunched here rather than by the elastic agent: its restarts reuse the
    rendezvous store, where gloo then finds the dead attempt's addresses (connection refused)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    prestart()
    limit = "unlimited" if max_failures < 0 else max_failures
    quiet = not spec.config.ray.show_worker_logs
    restarts = 0
    while True:
        with (
            tempfile.TemporaryDirectory(prefix="aevb-local-") as tmp,
            _quiet_loggers(_PROCESS_LOGGERS if quiet else []),
        ):
            try:
                _launch(spec, num_workers, tmp)
                return
            except ChildFailedError as err:
                error = _group_error(os.path.join(tmp, "errors"), err)
            except SignalException as err:  # Ctrl-C or SIGTERM: the agent has stopped the workers
                raise KeyboardInterrupt(str(err)) from None
        if 0 <= max_failures <= restarts:
            raise error
        restarts += 1
        say(
            f"a worker failed ({error}); restarting all {num_workers} from the newest checkpoint "
            f"(restart {restarts} of {limit})"
        )


def _launch(spec: WorkerSpec, num_workers: int, tmp: str) -> None:
    """One attempt: a fresh rendezvous on a free loopback port, `num_workers` processes, no restarts."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.makedirs(os.path.join(tmp, "errors"))
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=num_workers,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        local_addr="127.0.0.1",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="forkserver",
        # SIGINT and SIGTERM stay the driver's (stop_request.stop_on_signals): the agent must not take them over.
        signals_to_handle="SIGHUP,SIGQUIT",
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(tmp, "logs")),
    )
    elastic_launch(launch, _worker)(spec, os.path.join(tmp, "errors"), os.getpid())


@contextlib.contextmanager
def _quiet_loggers(names: list[str]):
    """Silence the launcher's per-process tracebacks: the cause is reported once, as one line."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _group_error(error_dir: str, err: Exception) -> Exception:
    """The workers' own reason for failing (the files `_worker` left): a user's mistake on any rank
    becomes a one-line ValueError; otherwise each failed rank's exception, or what killed it."""
    written = {}
    for name in os.listdir(error_dir):
        with open(os.path.join(error_dir, name)) as f:
            written[int(name[len("rank") : -len(".json")])] = json.load(f)
    for report in written.values():
        if report["user_error"] is not None:
            return ValueError(report["user_error"])
    failures = getattr(err, "failures", None) or {}
    reasons = [
        f"rank {rank}: {written[rank]['reason'] if rank in written else _exit_reason(failure)}"
        for rank, failure in sorted(failures.items())
    ]
    return RuntimeError("training failed in local mode: " + ("; ".join(reasons) or str(err)))


def _exit_reason(failure) -> str:
    """Why a rank that left no report ended: the signal that killed it, or its exit code."""
    if failure.exitcode < 0:  # killed: "Signal 9 (SIGKILL) received by PID ..."
        return failure.message
    return f"exited with code {failure.exitcode} before the training function could say why (its output is above)"
