"""The embedded Ray's settings: set where the user set none, kept where the user did, taken back at the end."""

import os
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest

from aevb_dist.cluster import compat, ray_runtime
from aevb_dist.cluster.ray_runtime import EMBEDDED_RAY_ENV, start_ray, stop_ray
from aevb_dist.console import Interrupted


@pytest.mark.slow  # starts an embedded Ray twice
def test_the_embedded_rays_settings_apply_to_it_alone(monkeypatch):
    import ray

    for name in EMBEDDED_RAY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's own value
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")  # the user's, for another Ray
    assert start_ray(None, state_api=True) is True
    try:
        for name, value in EMBEDDED_RAY_ENV.items():
            assert os.environ[name] == ("3" if name == "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" else value)
        # Ray's own processes find this Ray's State API, not another Ray's on this machine
        served = compat.dashboard_url()
        assert served and os.environ["RAY_API_SERVER_ADDRESS"] == f"http://{served}" and not served.endswith(":9")
        assert start_ray(None) is False  # joining our own Ray again changes nothing
    finally:
        stop_ray(True)
    assert [name for name in EMBEDDED_RAY_ENV if name in os.environ] == ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:9"  # given back

    # A Ray the user started in this process: joined as it is, none of the embedded settings left behind.
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        assert start_ray(None) is False
        assert [name for name in EMBEDDED_RAY_ENV if name in os.environ] == ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    finally:
        ray.shutdown()


def test_the_private_details_we_rely_on_are_where_we_use_them():
    """Every private detail of Ray and Python that aevb_dist relies on (`aevb_dist/cluster/compat.py`), against the
    installed Ray and Python: an upgrade that moves one fails here, by name. In a process of its own: reloading Ray's
    config would change the auth mode of any Ray this test process has joined."""
    code = """
import os
from aevb_dist.cluster import compat, ray_runtime

assert compat.checkpoint_manager_snapshot_name() == "checkpoint_manager_snapshot.json"
from ray.train.v2._internal.execution.context import TrainContext, get_train_context  # preemption_context's
assert "preemption_context" in TrainContext.__dataclass_fields__
assert compat.preemption_context() is None  # outside a worker: none, not an error
from ray._private.state import state
assert callable(state.get_max_resources_from_cluster_config)
assert compat.over_ray_client() is False  # no Ray joined: not through Ray Client
from ray.exceptions import ActorDiedError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
died = ActorDiedError()
assert compat.ray_train_machinery_failure(WorkerHealthCheckFailedError("a health check failed", died)) is died
assert compat.ray_train_machinery_failure(ValueError("the training function's")) is None
import inspect
from ray.util.client import worker as client_worker
from ray.util.client.server import proxier
assert "raise ConnectionAbortedError" in inspect.getsource(client_worker)  # how the proxier's error reaches us
for words in compat.RAY_CLIENT_SERVER_FAILURES[::2]:  # the proxier's own words (ZombieProcess is psutil's)
    assert words in inspect.getsource(proxier), words
    assert compat.ray_client_server_failed(ConnectionAbortedError(f"Initialization failure from server: {words}"))
assert not compat.ray_client_server_failed(ConnectionError("Starting Ray client server failed"))
for mode in ("token", "disabled"):  # Ray re-reads RAY_AUTH_MODE when asked to
    os.environ["RAY_AUTH_MODE"] = mode
    compat.reload_ray_config()
    assert compat.authentication_mode() == mode, mode
import logging
from ray._private.authentication import authentication_token_setup as token_setup
assert token_setup.logger.name == compat.RAY_TOKEN_AUTH_LOGGER  # where Ray warns
assert compat.RAY_TOKEN_AUTH_NOTICE in inspect.getsource(token_setup._warn_token_auth_enabled)
compat.quiet_token_auth_notice()
compat.quiet_token_auth_notice()  # once, however often asked
assert len(token_setup.logger.filters) == 1
class Seen(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())
seen = Seen()
token_setup.logger.addHandler(seen)
token_setup._warn_token_auth_enabled()
token_setup._warn_token_auth_disabled()  # a warning the user can act on stays
assert len(seen.messages) == 1 and seen.messages[0].startswith("Token authentication is disabled"), seen.messages
import atexit, threading
ran = []
atexit.register(ran.append, "exit handler")
compat.run_exit_handlers()
assert ran == ["exit handler"]
def interrupt():
    compat.interrupt_main_thread()
import signal, time
# Python's own Ctrl-C handler, and SIGINT ignored (as in a command a script started in the background)
for handler in (signal.default_int_handler, signal.SIG_IGN):
    signal.signal(signal.SIGINT, handler)
    try:
        threading.Thread(target=interrupt).start()
        # Short sleeps: the main thread sees the interrupt between two of them (a simulated Ctrl-C does not cut a
        # sleep short), and a loaded machine may start the thread late.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)
        raise AssertionError(f"not interrupted, SIGINT handler {handler}")
    except KeyboardInterrupt:
        pass
print("checked")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "checked" in proc.stdout, proc.stderr[-3000:]


class _DropsItsException:
    """A signal that lands in a finalizer, as in logging's at-fork hook while Ray starts its processes: Python
    runs the handler there, prints "Exception ignored" and drops its exception."""

    def __init__(self, signum: Optional[int]):
        self.signum = signum  # None: a plain error in the finalizer, with no signal

    def __del__(self):
        if self.signum is None:
            raise ValueError("not a signal's")
        os.kill(os.getpid(), self.signum)
        for _ in range(1000):  # the handler runs at the next bytecode boundary, inside this method
            pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_whose_exception_python_dropped_during_rays_start_up_still_ends_it(signum, monkeypatch):
    """SIGTERM goes to Ray's handler while ray.init runs (sys.exit); Ctrl-C to the caller's (train's raises).
    The dropped exception is not printed ("Exception ignored" and a traceback); another one still is."""
    import ray  # noqa: F401  (the start-up's module: start_ray has imported it when the block runs)

    printed = []  # what Python would print as "Exception ignored"
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: printed.append(type(unraisable.exc_value)))
    told = []

    def callers(signum, frame):  # train's, before training: says so, and stops at once
        told.append(signum)
        raise Interrupted(signum, told=True)

    previous = {s: signal.signal(s, callers) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(Interrupted) as stopped:
            with ray_runtime._keeping_sigterm_handler():
                signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init installs
                _DropsItsException(signum)
                _DropsItsException(None)
        assert stopped.value.signum == signum and told == [signum]  # the caller's handler heard it once
        assert printed == [ValueError]  # the signal's exception was answered, not printed
        assert signal.getsignal(signal.SIGTERM) is callers  # the caller's handler is back
        assert signal.set_wakeup_fd(-1) == -1  # and no wakeup fd is left behind
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# Ctrl-C lands as logging's at-fork hook begins in the parent (the profile hook sends it on that call), as Ray forks
# while it starts: the hook's exception is dropped before it gives back logging's module lock.
CTRL_C_IN_LOGGINGS_FORK_HOOK = """
import logging, os, signal, sys, threading
import ray  # noqa: F401
from aevb_dist.cluster import ray_runtime
from aevb_dist.console import Interrupted

def callers(signum, frame):
    raise Interrupted(signum, told=True)

def send_ctrl_c_there(frame, event, arg):
    if event == "call" and frame.f_code.co_name in ("_releaseLock", "_afterFork"):
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGINT)

signal.signal(signal.SIGINT, callers)
try:
    with ray_runtime._keeping_sigterm_handler():
        sys.setprofile(send_ctrl_c_there)
        child = os.fork()
        if child == 0:
            os._exit(0)
        sys.setprofile(None)
        os.waitpid(child, 0)
    print("not interrupted", flush=True)
except Interrupted as stopped:
    print("interrupted", stopped.signum, flush=True)
other = threading.Thread(target=lambda: logging.getLogger("another.thread").warning("logged"), daemon=True)
other.start()
other.join(30)
print("another thread logged" if not other.is_alive() else "another thread waits on logging's lock", flush=True)
os._exit(0)
"""


def test_a_ctrl_c_dropped_in_loggings_fork_hook_ends_the_start_up_and_leaves_logging_usable():
    """The command's exit handlers once waited 10 s on logging's lock, held for good by the main thread."""
    proc = subprocess.run(
        [sys.executable, "-c", CTRL_C_IN_LOGGINGS_FORK_HOOK], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.split("\n")[:2] == ["interrupted 2", "another thread logged"], proc.stdout + proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]


# The main thread inside native code that a signal does not cut short (as ray.init is, connecting to a GCS the
# same SIGTERM ended: Ray gives up after 60 s and exits 1), and SIGTERM sent to the command.
STUCK_IN_NATIVE_CODE = """
import hashlib, os, signal, threading, time
import ray  # noqa: F401
from aevb_dist.cluster import ray_runtime

signal.signal(signal.SIGTERM, lambda signum, frame: print("handler ran", flush=True))
threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
started = time.monotonic()
with ray_runtime._keeping_sigterm_handler():
    hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10**9)  # minutes of C with no Python in between
print("the block ended", round(time.monotonic() - started), flush=True)
"""


def test_a_stop_signal_during_a_start_up_stuck_in_native_code_ends_the_command_within_seconds():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STUCK_IN_NATIVE_CODE], capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 128 + signal.SIGTERM and took < 60, (took, proc.stdout, proc.stderr[-3000:])
    assert "SIGTERM while the start-up does not answer (5 s): stopping now, with nothing to checkpoint" in proc.stderr
    assert "the block ended" not in proc.stdout and "Traceback" not in proc.stderr
