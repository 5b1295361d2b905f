"""`ray.local_mode=true`: Ray Train's local mode on processes of this machine, with no Ray cluster.

Why it exists: on the embedded Ray, Ray Train V2 starts a controller and six helper actors, each a
fresh Python process importing Ray Train (~21 CPU-seconds in all, measured: 12-14 s to the first
step on 2 cores). In local mode (`ScalingConfig(num_workers=0)`) Ray Train runs the training
function in the calling process and, when the torchrun variables are set, joins a torch process
group from them. Here torch.distributed's elastic launcher starts one process per worker with those
variables, forked from a server that has the heavy modules imported already, so a run starts in a
few seconds. The worker function is the same as on a cluster (`ray_launcher.train_loop_per_worker`).

What Ray Train's controller did that local mode does not, is done here or in the worker:
- a failed worker stops the whole group (the elastic agent's job), which is launched again from the
  newest complete checkpoint, up to `train.max_failures` times;
- rank 0 writes its checkpoints into the run folder itself (manifest last) and keeps the newest
  `checkpoint.keep_last`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import select
import tempfile
import threading
import time
import uuid
from typing import Optional

from aevb_dist.ray_runtime import USER_ERRORS, say

_PRELOAD = ["aevb_dist.forkserver_preload"]  # imported once in the fork server, not in every worker
_PROCESS_LOGGERS = ["torch.distributed.elastic.multiprocessing", "torch.multiprocessing"]


def prestart() -> None:
    """Start the fork server now, so its imports overlap with the caller's own start-up work."""
    multiprocessing.set_forkserver_preload(_PRELOAD)  # no effect once the server runs
    multiprocessing.forkserver.ensure_running()


def _worker(loop_config: dict, error_dir: str, driver_pid: int) -> None:
    """One worker process: Ray Train's local-mode TorchTrainer around the cluster worker function."""
    _die_with_driver(driver_pid)
    cfg_dict = loop_config["config"]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if not cfg_dict["train"]["use_gpu"]:
        # Ray's local controller picks NCCL whenever CUDA is visible; CPU training needs gloo.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aevb_dist.config import config_from_dict
    from aevb_dist.ray_launcher import _storage_for_ray, train_loop_per_worker

    cfg = config_from_dict(cfg_dict)
    error_file = os.path.join(error_dir, f"rank{os.environ.get('RANK', '0')}.txt")
    if not cfg.ray.show_worker_logs:  # "Running in local mode", "Reported metrics" at every report
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    storage_path, storage_fs = _storage_for_ray(cfg)
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                           scaling_config=ScalingConfig(num_workers=0),
                           run_config=RunConfig(name=cfg.run.name, storage_path=storage_path,
                                                storage_filesystem=storage_fs))
    try:
        trainer.fit()
    except BaseException as err:
        # The launcher only sees an exit code: leave it the cause, one line, and whether it is the user's.
        text = (str(err).strip().splitlines() or [""])[0]
        with open(error_file, "w") as f:
            f.write(f"{isinstance(err, USER_ERRORS):d}\t{type(err).__name__}\t{text}")
        raise


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


def run(loop_config: dict, num_workers: int, max_failures: int) -> None:
    """Run `num_workers` local-mode workers to the end; raises ValueError for a user's mistake.

    A failed attempt is relaunched here rather than by the elastic agent: its restarts reuse the
    rendezvous store, where gloo then finds the dead attempt's addresses (connection refused)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    prestart()
    limit = "unlimited" if max_failures < 0 else max_failures
    quiet = not loop_config["config"]["ray"]["show_worker_logs"]
    restarts = 0
    while True:
        with tempfile.TemporaryDirectory(prefix="aevb-local-") as tmp, \
                _quiet_loggers(_PROCESS_LOGGERS if quiet else []):
            try:
                _launch(loop_config, num_workers, tmp)
                return
            except ChildFailedError as err:
                error = _worker_error(os.path.join(tmp, "errors"), err)
            except SignalException as err:  # Ctrl-C or SIGTERM: the agent has stopped the workers
                raise KeyboardInterrupt(str(err)) from None
        if 0 <= max_failures <= restarts:
            raise error
        restarts += 1
        say(f"a worker failed ({error}); restarting all {num_workers} from the newest checkpoint "
            f"(restart {restarts} of {limit})")


def _launch(loop_config: dict, num_workers: int, tmp: str) -> None:
    """One attempt: a fresh rendezvous on a free loopback port, `num_workers` processes, no restarts."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.makedirs(os.path.join(tmp, "errors"))
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=num_workers, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1", max_restarts=0,
        monitor_interval=0.1, start_method="forkserver",
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(tmp, "logs")))
    elastic_launch(launch, _worker)(loop_config, os.path.join(tmp, "errors"), os.getpid())


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


def _worker_error(error_dir: str, err: Exception) -> Exception:
    """The workers' own reason for failing: a user's mistake on any rank becomes a one-line ValueError;
    otherwise each failed rank's exception, or the signal that killed it."""
    written = {}
    for name in os.listdir(error_dir):
        with open(os.path.join(error_dir, name)) as f:
            user_error, kind, text = f.read().split("\t", 2)
        if user_error == "1":
            return ValueError(text)
        written[int(name[len("rank"):-len(".txt")])] = (kind, text)
    failures = getattr(err, "failures", None) or {}
    reasons = [f"rank {rank}: {_reason(written.get(rank), failure)}" for rank, failure in sorted(failures.items())]
    return RuntimeError("training failed in local mode: " + ("; ".join(reasons) or str(err)))


def _reason(written: Optional[tuple[str, str]], failure) -> str:
    if written is not None:
        return ": ".join(written)
    if failure.exitcode < 0:  # killed: "Signal 9 (SIGKILL) received by PID ..."
        return failure.message
    return f"exited with code {failure.exitcode} before the training function could say why (its output is above)"
