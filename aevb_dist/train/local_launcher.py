"""`ray.local_mode=true`: the workers as processes of this machine, with no Ray at all.

Why it exists: on the embedded Ray, Ray Train V2 starts a controller and six helper actors, each a
fresh Python process importing Ray Train (~21 CPU-seconds in all, measured: 12-14 s to the first
step on 2 cores). Here one supervisor, this module, forks one process per worker from a server that
has the heavy modules imported already (fork_server.py), hands each its `WorkerContext` (rank, world
size, device) and a gloo (or NCCL) process group joined through a store of this attempt's own, and
runs the same worker function as on a cluster (`worker.run_worker`). A run starts in a few seconds.

What Ray Train's controller does on a cluster is done here, by one rule: a failed worker stops the
whole group, which is launched again from the newest complete checkpoint, up to `train.max_failures`
times (`run_group`). Checkpoints go into the run folder as on Ray (`run_folder_sink.WriteToRunFolder`:
rank 0 writes them itself, manifest last, and prunes).
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import sys
import threading
import time
import traceback
from typing import Optional

from aevb_dist.cluster import compat
from aevb_dist.cluster.ray_runtime import threads_for_cpus
from aevb_dist.console import first_line, say, user_error_in
from aevb_dist.run import storage
from aevb_dist.train.fork_server import prestart
from aevb_dist.train.run_folder_sink import WriteToRunFolder
from aevb_dist.train.worker import WorkerContext, WorkerSpec, run_worker

# A collective that waits longer than this for a peer fails (gloo's default is 30 min); the supervisor stops
# the group as soon as one worker fails, so this bounds only a hang that no exit would reveal.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


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
        f"training {cfg.run.name} in local mode: {n} worker process(es), {spec.threads} thread(s) "
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


def run_group(spec: WorkerSpec, num_workers: int, max_failures: int) -> None:
    """Run `num_workers` workers to the end; raises ValueError for a user's mistake, RuntimeError when the
    group failed more than `max_failures` times (-1: no limit)."""
    prestart()
    limit = "unlimited" if max_failures < 0 else max_failures
    restarts = 0
    while True:
        failure = _attempt(spec, num_workers)
        if failure is None:
            return
        if 0 <= max_failures <= restarts:  # any failure is retried, as Ray Train retries on a cluster
            raise failure
        restarts += 1
        say(
            f"a worker failed ({failure}); restarting all {num_workers} from the newest checkpoint "
            f"(restart {restarts} of {limit})"
        )


def _attempt(spec: WorkerSpec, num_workers: int) -> Optional[Exception]:
    """One launch of the group: None when every worker ended well; else why it failed (a ValueError for a
    user's mistake on any rank). The store is this attempt's own: a restart never meets a dead attempt's
    addresses in it. Ctrl-C and SIGTERM are the driver's (stop_request.py), never the workers'."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, num_workers, is_master=True, wait_for_workers=False)
    context = multiprocessing.get_context("forkserver")
    pipes = [context.Pipe(duplex=False) for _ in range(num_workers)]  # each worker's last word
    workers = [
        context.Process(
            target=_worker,
            args=(spec, rank, num_workers, store.port, send, os.getpid()),
            name=f"aevb-worker-{rank}",
        )
        for rank, (_, send) in enumerate(pipes)
    ]
    try:
        for worker, (_, send) in zip(workers, pipes):
            worker.start()
            send.close()
        return _wait_for_group(workers, [receive for receive, _ in pipes])
    finally:
        _stop(workers)
        for receive, _ in pipes:
            receive.close()
        del store


def _wait_for_group(workers: list, receives: list) -> Optional[Exception]:
    """Until every worker has exited well, or one has failed (the others are then stopped): why it failed."""
    running = {worker.sentinel: worker for worker in workers}
    while running:
        for sentinel in multiprocessing.connection.wait(list(running)):
            if running.pop(sentinel).exitcode != 0:
                return _group_error(workers, receives)
    return None


def _group_error(workers: list, receives: list) -> Exception:
    """The workers' own reasons (each failed worker sends its reason before it exits): a user's mistake on any
    rank becomes a one-line ValueError; otherwise each failed rank's exception, or what ended it."""
    reports = {rank: report for rank, receive in enumerate(receives) if (report := _last_word(receive)) is not None}
    for user_error, _ in reports.values():
        if user_error is not None:
            return ValueError(user_error)
    reasons = [
        f"rank {rank}: {reports[rank][1] if rank in reports else _exit_reason(worker.exitcode)}"
        for rank, worker in enumerate(workers)
        if rank in reports or worker.exitcode not in (None, 0)
    ]
    return RuntimeError("training failed in local mode: " + "; ".join(reasons))


def _last_word(receive) -> Optional[tuple]:
    """What a worker sent before it exited; None from one that sent nothing (killed, or ended well)."""
    try:
        return receive.recv() if receive.poll(0) else None
    except EOFError:
        return None


def _exit_reason(exitcode: int) -> str:
    """Why a rank that left no report ended: the signal that killed it, or its exit code."""
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode} before the training function could say why (its output is above)"


def _stop(workers: list) -> None:
    """Every worker still running is killed: after a failure the others wait on it in a collective, and after
    a second Ctrl-C the command stops at once. A checkpoint cut off this way has no manifest: never used."""
    for worker in workers:
        if worker.pid is not None and worker.exitcode is None:
            worker.kill()
    for worker in workers:
        if worker.pid is not None:
            worker.join()


def _worker(spec: WorkerSpec, rank: int, world_size: int, store_port: int, send, driver_pid: int) -> None:
    """One worker process: its context and process group, the cluster's worker function, and its last word to
    the supervisor: nothing when it ended well, else (the user's mistake or None, the reason in one line)."""
    _die_with_driver(driver_pid)
    # A terminal's Ctrl-C reaches every process of the group, a scheduler's SIGTERM may too: the driver answers
    # them (stop_request.py: rank 0 checkpoints the next step and every rank stops).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        context = _join_group(spec, rank, world_size, store_port)
        sink = WriteToRunFolder(spec.run, spec.config.checkpoint.keep_last, spec.config.run.storage_retry_s)
        run_worker(spec, sink, context)
        sink.wait()  # the last checkpoint, uploaded in the background, is in the run folder
        _leave_group()
    except BaseException as err:  # told once, in one line, by the supervisor; the traceback where asked
        if spec.config.ray.show_worker_logs:
            traceback.print_exc()
        user_error = user_error_in(err)
        send.send((None if user_error is None else str(user_error), f"{type(err).__name__}: {first_line(err)}"))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # at once: a peer may be gone, and leaving the group could wait for it
    finally:
        send.close()


def _join_group(spec: WorkerSpec, rank: int, world_size: int, store_port: int) -> WorkerContext:
    """This worker's context; with several workers, the process group joined (gloo on CPUs, NCCL on GPUs)."""
    import torch
    import torch.distributed as dist

    device = "cpu"
    if spec.config.train.use_gpu:
        torch.cuda.set_device(rank)  # launch_local checked there is a GPU per worker
        device = f"cuda:{rank}"
    if world_size > 1:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
        backend = "nccl" if spec.config.train.use_gpu else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return WorkerContext(rank=rank, world_size=world_size, device=device)


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


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
