"""Starting Ray (embedded or a cluster), sizing workers to its CPUs, and running tasks on it."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from typing import Any, Callable, Optional

from aevb_dist.console import say


def cluster_auth_token() -> Optional[str]:
    """The Ray cluster's token, where Ray's own CLI finds it: $RAY_AUTH_TOKEN, the file that
    $RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token (written by `ray start --head`); None if none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def use_cluster_token_if_found() -> None:
    """Token authentication for the clusters this process joins, when a token is at hand and
    RAY_AUTH_MODE says nothing: Ray itself does so only for `ray.init()` without an address, so a
    run with `ray.address=ray://head:10001` would otherwise be refused by a default head. Must run
    before Ray is imported (Ray reads the mode once)."""
    if "RAY_AUTH_MODE" not in os.environ and cluster_auth_token() is not None:
        os.environ["RAY_AUTH_MODE"] = "token"


AUTH_HELP = ("get the cluster's token with `ray get-auth-token` on the head, then set RAY_AUTH_TOKEN, "
             "or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in ~/.ray/auth_token")


# The embedded Ray serves one run on this machine, and shares its cores with the workers. Its settings are
# environment variables (read when Ray is imported or started, and by Ray Train when a run starts), set
# only where the user set none, and taken back by stop_ray: a later cluster run in this process keeps Ray's.
EMBEDDED_RAY_ENV = {
    # On loopback only (read when ray is imported), and gloo too.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GLOO_SOCKET_IFNAME": "lo",
    # Ray Train's controller polls its workers (each poll wakes the worker's main thread, which takes the
    # GIL from the training thread); Ray's default 2 s adds seconds to every short run, 0.2 s cost ~5% of
    # the steady state at M=100 on 2 cores (README "Performance"). 1 s ends a run ≤ 1 s after its last step.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
    # Ray prestarts one idle worker per CPU for the first driver; Ray Train's actors (their own runtime
    # env) never use them, and on 2 cores starting them delays the controller: a tiny run measured
    # 18.3 → 17.0 s from command to exit (means of 3). Tasks start workers on demand.
    "RAY_prestart_worker_first_driver": "0",
    # Every Ray Python process wakes ~100 times a second; each wake on a busy core stalls a training thread
    # and, at a small batch, its partner thread with it. Not started on a machine of its own: the
    # preemption watcher (its one node is never drained by an autoscaler) and the metrics that no
    # dashboard or Prometheus reads here. Measured with the health-check change above: +8% samples/s at
    # M=100, 1 worker, in 6 of 6 alternated pairs.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
}
_embedded_env_set: list[str] = []  # what start_ray set, for stop_ray to take back


def _use_embedded_ray_env() -> list[str]:
    names = [name for name in EMBEDDED_RAY_ENV if name not in os.environ]
    for name in names:
        os.environ[name] = EMBEDDED_RAY_ENV[name]
    return names


def _drop_env(names: list[str]) -> None:
    for name in names:
        os.environ.pop(name, None)


def start_ray(address: Optional[str], show_worker_logs: bool = False) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS, set inside Ray Jobs), or start an embedded
    local Ray; True when we started it."""
    from_environment = not address and bool(os.environ.get("RAY_ADDRESS"))
    address = address or os.environ.get("RAY_ADDRESS") or None
    set_now = [] if address else _use_embedded_ray_env()
    import ray

    if ray.is_initialized():  # a Ray this process joined before (ours: its settings stay until stop_ray)
        _drop_env(set_now)
        return False
    with _keeping_sigterm_handler():
        if address:
            if from_environment:  # said, so that nobody joins a cluster without knowing it
                say(f"joining the Ray cluster at $RAY_ADDRESS={address} (unset RAY_ADDRESS for an embedded Ray)")
            ray.init(address=address, log_to_driver=show_worker_logs)
            return False
        # address="local": always a new embedded cluster, never one that `ray start` left on this machine.
        try:
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     log_to_driver=show_worker_logs, configure_logging=True, logging_level="WARNING")
        except BaseException:
            _drop_env(set_now)
            raise
        _embedded_env_set.extend(set_now)
        return True


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """ray.init makes SIGTERM exit the driver at once (sys.exit); the caller's own handler stays (train's:
    a checkpoint at the next step, then exit; train/stop_request.py)."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)


def stop_ray(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()
        _drop_env(_embedded_env_set)
        _embedded_env_set.clear()


def cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1.0)


def threads_for_cpus(cpus: float) -> int:
    """Torch threads for a worker holding `cpus` CPUs (fractions round down, at least one): the one
    rule every launcher and Ray task uses."""
    return max(1, math.floor(cpus + 1e-6))


def run_tasks(remote_fn, arg_lists: list[tuple], *, max_in_flight: int, num_cpus: float,
              on_done: Callable[[int, Any], None], num_gpus: float = 0) -> None:
    """Run `remote_fn(*args)` for each args tuple, at most `max_in_flight` at once; `on_done(i, result)`."""
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=2)(remote_fn)
    pending: dict = {}
    next_i = 0
    while next_i < len(arg_lists) or pending:
        while next_i < len(arg_lists) and len(pending) < max_in_flight:
            pending[task.remote(*arg_lists[next_i])] = next_i
            next_i += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            on_done(pending.pop(ref), ray.get(ref))
