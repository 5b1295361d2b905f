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


def start_ray(address: Optional[str], show_worker_logs: bool = False) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS, set inside Ray Jobs), or start an embedded
    local Ray; True when we started it."""
    from_environment = not address and bool(os.environ.get("RAY_ADDRESS"))
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        # An embedded Ray serves this machine only: keep it on loopback (read when ray is imported),
        # and let gloo use loopback too.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        # Ray Train's controller polls its workers; the default 2 s adds seconds to every short run.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        # Ray prestarts one idle worker per CPU for the first driver; Ray Train's actors (their own
        # runtime env) never use them, and on 2 cores starting them delays the controller: a tiny run
        # measured 18.3 → 17.0 s from command to exit (means of 3). Tasks start workers on demand.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    import ray

    if ray.is_initialized():
        return False
    with _keeping_sigterm_handler():
        if address:
            if from_environment:  # said, so that nobody joins a cluster without knowing it
                say(f"joining the Ray cluster at $RAY_ADDRESS={address} (unset RAY_ADDRESS for an embedded Ray)")
            ray.init(address=address, log_to_driver=show_worker_logs)
            return False
        # address="local": always a new embedded cluster, never one that `ray start` left on this machine.
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=show_worker_logs, configure_logging=True, logging_level="WARNING")
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
