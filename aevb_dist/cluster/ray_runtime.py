"""Starting Ray (embedded or a cluster), sizing workers to its CPUs, and running tasks on it."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional

from aevb_dist.cluster import compat
from aevb_dist.console import Interrupted, SignalsHeard, say


def cluster_auth_token() -> Optional[str]:
    """The Ray cluster's token, where Ray's own CLI finds it: $RAY_AUTH_TOKEN, the file that
    $RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token (written by `ray start --head`); None if none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    try:
        with open(_token_file()) as f:
            return f.read().strip() or None
    except OSError:
        return None


def token_source() -> str:
    """Where `cluster_auth_token` looks, for messages."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "$RAY_AUTH_TOKEN"
    return _token_file()


def _token_file() -> str:
    """The token file Ray's CLI reads: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


AUTH_HELP = (
    "get the cluster's token with `ray get-auth-token` on the head, then set RAY_AUTH_TOKEN, "
    "or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in ~/.ray/auth_token"
)
GCS_PROBE_TIMEOUT_S = 10.0  # a head that does not answer within this is refused (Ray itself retries forever)
RAY_CLIENT_PORT = 10001  # Ray Client's port where a ray:// address names none (Ray's default)
# One call each server answers without a session: the GCS (a `host:port` address) and the Ray Client server
# (`ray://host:port`). Both take empty request bytes, and check a cluster's token before anything else.
_GCS_CALL = "/ray.rpc.NodeInfoGcsService/GetClusterId"
_RAY_CLIENT_CALL = "/ray.rpc.RayletDriver/ClusterInfo"


def _probe(address: str, token: Optional[str], timeout_s: float = GCS_PROBE_TIMEOUT_S) -> tuple[str, str]:
    """Ask the Ray server at `address` (a GCS, or a Ray Client server for ray://) one question, sending `token`
    (or none): ("ok" | "unauthenticated" | "unreachable", details). Plain gRPC, without importing Ray, whose auth
    mode is read once per process."""
    import grpc

    target, method = _probe_target(address)
    channel = grpc.insecure_channel(target)
    call = channel.unary_unary(method, request_serializer=lambda request: request, response_deserializer=lambda r: r)
    try:
        call(b"", timeout=timeout_s, metadata=[("authorization", f"Bearer {token}")] if token else None)
        return "ok", ""
    except grpc.RpcError as err:
        code, details = err.code(), (err.details() or "").splitlines()[0] if err.details() else ""
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return "unauthenticated", details
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return "unreachable", details or code.name
        return (
            "ok",
            "",
        )  # it answered past the token check (a Ray of another version, say): Ray's connect tells the rest
    finally:
        channel.close()


def _probe_target(address: str) -> tuple[str, str]:
    if address.startswith("ray://"):
        host_port = address[len("ray://") :].split("/", 1)[0]
        return (host_port if _is_host_port(host_port) else f"{host_port}:{RAY_CLIENT_PORT}"), _RAY_CLIENT_CALL
    return address, _GCS_CALL


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and "://" not in address and port.isdigit()


def _can_ask(address: str) -> bool:
    """Whether the cluster at `address` can be asked how it is set up: a GCS or a Ray Client server over plain
    gRPC. Not over TLS (RAY_USE_TLS), nor through another scheme (anyscale://...)."""
    tls = os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true")
    return not tls and (_is_host_port(address) or address.startswith("ray://"))


def choose_auth_mode(address: str) -> bool:
    """Join the cluster at `address` the way it is set up: with its token where it uses token
    authentication, without one where it does not (a driver in token mode on a cluster without it has
    its actors cancelled: `SchedulingCancelled`; over Ray Client it waits 30-40 s, then fails). Told by asking
    the cluster's GCS (`host:port`) or Ray Client server (`ray://`), before Ray is started here. A head that
    does not answer, a missing or wrong token, and a RAY_AUTH_MODE that contradicts the cluster are one line
    each. `auto` is the cluster `ray start` left on this machine. Where the cluster cannot be asked (TLS), the
    token is used if one is at hand, and False is returned: a failed connect is then told by
    `auth_mode_unknown`."""
    chosen = os.environ.get("RAY_AUTH_MODE", "").lower()
    token = cluster_auth_token() if chosen != "disabled" else None
    if address == "auto":  # the cluster `ray start` last started on this machine
        try:
            address = compat.running_cluster_address()
        except ConnectionError:
            raise ValueError(
                "ray.address=auto: no Ray cluster runs on this machine; start one (`ray start "
                "--head`) or give the head's address, ray.address=HOST:PORT"
            ) from None
    if not _can_ask(address):
        if not chosen and token is not None:
            _set_auth_mode("token")
        return False
    answer, details = _probe(address, None)
    if answer == "unreachable":
        raise ValueError(
            f"nothing answers at ray.address={address} ({details}): start the head (`ray start "
            "--head`) or check the address (`ray status` on the head prints it)"
        )
    needs_token = answer == "unauthenticated"
    if chosen == "token" and not needs_token:
        raise ValueError(
            f"RAY_AUTH_MODE=token, but the Ray cluster at {address} runs without token "
            "authentication: unset RAY_AUTH_MODE (or set it to disabled)"
        )
    if chosen == "disabled" and needs_token:
        raise ValueError(
            f"RAY_AUTH_MODE=disabled, but the Ray cluster at {address} uses token authentication: "
            f"unset RAY_AUTH_MODE and {AUTH_HELP}"
        )
    if needs_token:
        if token is None:
            raise ValueError(
                f"the Ray cluster at {address} uses token authentication and no token was found "
                f"({token_source()}); {AUTH_HELP}"
            )
        if _probe(address, token)[0] == "unauthenticated":
            raise ValueError(
                f"the Ray cluster at {address} refused the token in {token_source()} (not the cluster's); {AUTH_HELP}"
            )
    _set_auth_mode("token" if needs_token else "disabled")
    return True


def auth_mode_unknown(address: str, err: BaseException) -> ValueError:
    """A connect that failed where the cluster's auth mode could not be asked: one line naming what to set."""
    from aevb_dist.console import first_line

    mode = os.environ.get("RAY_AUTH_MODE") or "unset"
    return ValueError(
        f"could not join the Ray cluster at {address} ({first_line(err)}); its auth mode could not be asked "
        f"here (RAY_AUTH_MODE is {mode}): for a cluster with token authentication set RAY_AUTH_MODE=token "
        f"and put its token in {_token_file()} (or RAY_AUTH_TOKEN), for one without set RAY_AUTH_MODE=disabled"
    )


def head_answers(timeout_s: float = 2.0) -> bool:
    """Whether the GCS of the cluster this process joined still answers (within `timeout_s`: the caller's
    thread, the main one, takes Ctrl-C once the call returns). True where it cannot be asked (a Ray Client
    connection, ray://, has no GCS address of its own)."""
    import ray

    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - Ray Client's context, or a Ray that moved it: nothing to watch
        return True
    if not address or not _is_host_port(address):
        return True
    token = cluster_auth_token() if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else None
    return _probe(address, token, timeout_s)[0] != "unreachable"


def _set_auth_mode(mode: str) -> None:
    os.environ["RAY_AUTH_MODE"] = mode
    if "ray._raylet" in sys.modules:  # Ray is imported in this process already: it re-reads its config
        compat.reload_ray_config()


# The embedded Ray serves one run on this machine, and shares its cores with the workers. Its settings are
# environment variables (read when Ray is imported or started, and by Ray Train when a run starts), set
# only where the user set none, and taken back by stop_ray: a later cluster run in this process keeps Ray's.
EMBEDDED_RAY_ENV = {
    # On loopback only (read when ray is imported), and gloo too.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GLOO_SOCKET_IFNAME": "lo",
    # Ray Train's controller polls its workers (each poll wakes the worker's main thread, which takes the
    # GIL from the training thread); Ray's default 2 s adds seconds to every short run, 0.2 s cost ~5% of
    # the steady state at M=100 on 2 cores (docs/performance.md). 1 s ends a run ≤ 1 s after its last step.
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
# What start_ray set, each with the value it replaced (None: unset), for stop_ray to give back.
_embedded_env_replaced: dict[str, Optional[str]] = {}


def _use_embedded_ray_env() -> dict[str, Optional[str]]:
    names = [name for name in EMBEDDED_RAY_ENV if name not in os.environ]
    for name in names:
        os.environ[name] = EMBEDDED_RAY_ENV[name]
    return dict.fromkeys(names)


def _drop_env(replaced: dict[str, Optional[str]]) -> None:
    for name, before in replaced.items():
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def start_ray(address: Optional[str], show_worker_logs: bool = False, state_api: bool = False) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS, set inside Ray Jobs), or start an embedded
    local Ray; True when we started it. `state_api`: the embedded Ray serves Ray's State API (its dashboard
    process, on 127.0.0.1), which Ray Train's PlacementGroupCleaner asks whether a run's controller is gone:
    Tune kills a sweep's trial when it ends or ASHA stops it, and without it the trial's workers' CPUs stayed
    reserved. A Ray this process started before, without the dashboard, is refused then, in one line."""
    from_environment = not address and bool(os.environ.get("RAY_ADDRESS"))
    address = address or os.environ.get("RAY_ADDRESS") or None
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        if state_api and not address and not compat.dashboard_url():
            raise ValueError(
                "this process's Ray serves no dashboard, and a sweep's trials give their CPUs back through its "
                "State API: start Ray with include_dashboard=True, or let the sweep start its own"
            )
        return False  # a Ray this process joined before (ours: its settings stay until stop_ray)
    if address:
        if from_environment:  # said, so that nobody joins a cluster without knowing it
            say(f"joining the Ray cluster at $RAY_ADDRESS={address} (unset RAY_ADDRESS for an embedded Ray)")
        asked = choose_auth_mode(address)  # before Ray is imported, where it can be
    set_now = {} if address else _use_embedded_ray_env()
    dashboard_port = _free_port() if state_api and not address else None
    if dashboard_port is not None:
        # Ray Train's PlacementGroupCleaner (an actor of this Ray) asks the State API at RAY_API_SERVER_ADDRESS,
        # else at the one Ray it finds on this machine: with a second Ray here (a `ray start` head, another
        # sweep) it found two, raised, and every trial's CPUs stayed reserved, so the sweep waited forever.
        # Ray's processes inherit this environment; the port is free when asked, and Ray binds it moments later.
        set_now["RAY_API_SERVER_ADDRESS"] = os.environ.get("RAY_API_SERVER_ADDRESS")  # the user's, given back
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    import ray

    with _keeping_sigterm_handler():
        if address:
            _join(ray, address, show_worker_logs, asked)
            return False
        # address="local": always a new embedded cluster, never one that `ray start` left on this machine.
        compat.quiet_token_auth_notice()  # token authentication is on, as Ray's default for a new local cluster
        try:
            ray.init(
                address="local",
                num_cpus=os.cpu_count() or 1,
                include_dashboard=state_api,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,  # None (no dashboard): Ray's default
                log_to_driver=show_worker_logs,
                configure_logging=True,
                logging_level="WARNING",
            )
        except BaseException:
            _drop_env(set_now)
            raise
        _embedded_env_replaced.update(set_now)
        return True


RAY_CLIENT_JOIN_ATTEMPTS = 3  # its per-client server died at start in about 4 of 30 joins on a busy 2-core head


def _join(ray, address: str, show_worker_logs: bool, asked: bool) -> None:
    """ray.init on a cluster. Over Ray Client, the head starts a server process for each client; where that
    process dies at start (Ray's own failure, seen on a loaded head: not the auth mode, which was asked), the
    join is tried again, up to RAY_CLIENT_JOIN_ATTEMPTS times, then told in one line."""
    for attempt in range(1, RAY_CLIENT_JOIN_ATTEMPTS + 1):
        try:
            ray.init(address=address, log_to_driver=show_worker_logs)
            return
        except (ConnectionError, RuntimeError) as err:
            if not asked:
                raise auth_mode_unknown(address, err) from None
            if not compat.ray_client_server_failed(err):
                raise
            ray.shutdown()  # the half-made client connection, before the next one
            if attempt < RAY_CLIENT_JOIN_ATTEMPTS:
                say(
                    f"the Ray head at {address} could not start this job's Ray Client server (attempt {attempt} of "
                    f"{RAY_CLIENT_JOIN_ATTEMPTS}); trying again"
                )
                continue
            raise ValueError(
                f"the Ray head at {address} could not start this job's Ray Client server in {attempt} attempts: "
                "its reason is in ray_client_server_<port>.err among the head's Ray logs "
                "(/tmp/ray/session_latest/logs by default); --debug shows Ray's traceback"
            ) from err


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """ray.init makes SIGTERM exit the driver at once (sys.exit(15)); the caller's own handler stays (train's:
    a checkpoint at the next step, then exit; train/stop_request.py). A SIGTERM that arrives while ray.init
    runs is the caller's handler's to answer, and ends the start-up: an `Interrupted`, whose exit status is
    143, not Ray's 15. So does a Ctrl-C or SIGTERM whose exception Python dropped: one that lands in an at-fork
    hook (logging's, as Ray starts its processes) is printed as "Exception ignored" and the start-up went on,
    to train in full. Python's wakeup fd hears every signal, dropped or not."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    heard = SignalsHeard(exit_if_stuck_s=5.0) if main else None  # then a stop signal ends it, answered or not
    try:
        yield
    except SystemExit as exit_:
        if not main or exit_.code != signal.SIGTERM:
            raise
        _answer(signal.SIGTERM, before)
    finally:
        signals = heard.close() if heard else []
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)
    if signal.SIGTERM in signals or signal.SIGINT in signals:  # heard, yet the block ended as if it had not been
        sys.modules["ray"].shutdown()
        if signal.SIGTERM in signals:
            _answer(signal.SIGTERM, before)  # Ray's handler took it: the caller's has not seen it
        raise Interrupted(signal.SIGINT)  # the caller's handler ran, and its exception was the one dropped


def _answer(signum: int, handler) -> None:
    if callable(handler):
        handler(signum, None)  # says what it does; raises where it stops at once
    raise Interrupted(signum, told=callable(handler)) from None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_ray(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()
        _drop_env(_embedded_env_replaced)
        _embedded_env_replaced.clear()


def cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1.0)


def threads_for_cpus(cpus: float) -> int:
    """Torch threads for a worker holding `cpus` CPUs (fractions round down, at least one): the one
    rule every launcher and Ray task uses."""
    return max(1, math.floor(cpus + 1e-6))


def run_tasks(
    remote_fn,
    arg_lists: list[tuple],
    *,
    max_in_flight: int,
    num_cpus: float,
    on_done: Callable[[int, Any], None],
    num_gpus: float = 0,
) -> None:
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
