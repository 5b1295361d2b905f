"""The private details of Ray and of Python that aevb_dist depends on, in one place, each with what it is for.
A test checks every one against the installed Ray and Python
(`tests/test_ray_runtime.py::test_the_private_details_we_rely_on_are_where_we_use_them`), so an upgrade that
moves one fails there, by name, instead of deep inside a run.
"""

from __future__ import annotations


def reload_ray_config() -> None:
    """Make an already imported Ray re-read its settings from the environment (RAY_AUTH_MODE): Ray reads
    them once per process, and refreshes them this way itself when it turns token authentication on
    (`ray._private.authentication.authentication_token_setup._enable_token_auth`)."""
    from ray._raylet import Config

    Config.initialize("")


def authentication_mode() -> str:
    """The auth mode this process's Ray uses now: "token" or "disabled"."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"


def autoscaler_max_resources() -> dict:
    """The most resources the cluster's autoscaler may bring up ({} where it has no autoscaler: then the
    nodes alive now are all it has). What Ray Train itself checks a worker group against."""
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config() or {}


def over_ray_client() -> bool:
    """Whether this process joined its cluster through Ray Client (ray://): Ray's state API (what
    `autoscaler_max_resources` reads) is not served through it, so such questions go to a task on the cluster."""
    from ray.util.client import ray as client_ray

    return client_ray.is_connected()


def ray_client_server_failed(connect_failure: BaseException) -> bool:
    """Whether a Ray Client connect (ray://) failed because the head's Ray Client proxier could not start this
    client's own server process: it exited at once (Ray's "Starting Ray client server failed"), or while the
    proxier read its command line (psutil.ZombieProcess in `proxier.start_specific_server`), or before it
    served (the proxier's "Proxy failed to Connect to backend", after RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S).
    Ray sends the proxier's error back as the text of a ConnectionAbortedError: its words are all to match."""
    return isinstance(connect_failure, ConnectionAbortedError) and any(
        words in str(connect_failure) for words in RAY_CLIENT_SERVER_FAILURES
    )


RAY_CLIENT_SERVER_FAILURES = (
    "Starting Ray client server failed",
    "ZombieProcess",
    "Proxy failed to Connect to backend",
)


def ray_train_machinery_failure(worker_failure: BaseException):
    """The failure of Ray's own machinery behind a Ray Train worker's failure (its actor or its node died, a
    health check hung, the group could not start), or None where the training function itself raised."""
    from ray.exceptions import RayError, RayTaskError
    from ray.train.v2._internal.exceptions import (
        WorkerGroupStartupTimeoutError,
        WorkerHealthCheckFailedError,
        WorkerHealthCheckTimeoutError,
    )

    if isinstance(worker_failure, WorkerHealthCheckFailedError):
        return worker_failure.health_check_failure
    if isinstance(worker_failure, (WorkerHealthCheckTimeoutError, WorkerGroupStartupTimeoutError)):
        return worker_failure
    if isinstance(worker_failure, RayError) and not isinstance(worker_failure, RayTaskError):
        return worker_failure  # a task's error is the code's that ran in it
    return None


def preemption_context():
    """This Ray Train worker's preemption context, which Ray Train's watcher marks when the worker's node is
    drained for preemption (`.preemption_info`); None where the installed Ray Train has none. Read at every
    step: `ray.train.get_preemption_info()` is a barrier through Ray's actors at each call."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context
    except Exception:  # noqa: BLE001 - an older or newer Ray Train: no notice is ever seen
        return None


def checkpoint_manager_snapshot_name() -> str:
    """The file in a run folder where Ray Train lists the checkpoints it reported."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    return CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def running_cluster_address() -> str:
    """The GCS address (host:port) that `ray.address=auto` joins: the cluster `ray start` last started on this
    machine. Raises ConnectionError where none runs."""
    from ray._private.services import canonicalize_bootstrap_address

    address = canonicalize_bootstrap_address("auto")
    if address is None:
        raise ConnectionError("no running Ray instance found")
    return address


def dashboard_url() -> str:
    """The dashboard (and State API) address of the Ray this process joined; "" where it serves none."""
    from ray._private.worker import get_dashboard_url

    return get_dashboard_url() or ""


def run_exit_handlers() -> None:
    """Run the interpreter's exit handlers now (multiprocessing's, logging's, Ray's), as interpreter exit
    would: the command does so, then skips the rest of the teardown (`cli/main.console_main`)."""
    import atexit

    atexit._run_exitfuncs()


def interrupt_main_thread() -> None:
    """Raise KeyboardInterrupt in the main thread, from another thread, as Ctrl-C would. Also where SIGINT is
    ignored (a command started in the background by a script, or by `nohup`): there Python has no handler to
    simulate, and `_thread.interrupt_main` does nothing, so the exception is set on the main thread directly
    (seen, like the simulated signal, at its next Python instruction)."""
    import _thread
    import ctypes
    import signal
    import threading

    if callable(signal.getsignal(signal.SIGINT)):
        _thread.interrupt_main()
        return
    main = ctypes.c_ulong(threading.main_thread().ident)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(main, ctypes.py_object(KeyboardInterrupt))


def quiet_token_auth_notice() -> None:
    """Drop Ray's warning, at each start of a local cluster, that it turned token authentication on ("Token
    authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out"): the embedded Ray
    has it on by design, and the user has nothing to act on. Ray's other authentication warnings (one turned
    off, a token missing) stay. Installed once, on the logger of the module that warns."""
    import logging

    logger = logging.getLogger(RAY_TOKEN_AUTH_LOGGER)
    if not any(isinstance(f, _DropTokenAuthNotice) for f in logger.filters):
        logger.addFilter(_DropTokenAuthNotice())


RAY_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster."


class _DropTokenAuthNotice:
    def filter(self, record) -> bool:
        return not str(record.msg).startswith(RAY_TOKEN_AUTH_NOTICE)
