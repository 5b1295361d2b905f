"""Joining a Ray cluster the way it is set up, and Ray's failures told in one line within a bounded time:
real heads with and without token authentication, a token file present either way."""

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

import psutil
import pytest

from aevb_dist.cluster.ray_runtime import GCS_PROBE_TIMEOUT_S, RAY_CLIENT_JOIN_ATTEMPTS, choose_auth_mode
from tests.helpers import SMOKE, aevb, error_lines, free_port, tiny_overrides


def home_with_token(tmp_path, token: str) -> dict:
    """A HOME whose ~/.ray/auth_token holds `token`, as `ray start --head` leaves one on any machine."""
    home = tmp_path / f"home-{secrets.token_hex(4)}"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token)
    return {"HOME": str(home)}


AUTH_SETTINGS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # the user's shell sets none of them


def without_auth_settings() -> dict:
    return {k: v for k, v in os.environ.items() if k not in AUTH_SETTINGS}


def train_args(tiny_data, tmp_path, address: str, name: str, *extra: str) -> list[str]:
    return [
        "train",
        SMOKE,
        *tiny_overrides(
            tiny_data,
            str(tmp_path / "runs"),
            **{"train.num_workers": 1, "train.cpus_per_worker": 1, "train.max_steps": 8},
        ),
        f"run.name={name}",
        f"ray.address={address}",
        *extra,
    ]


def run_aevb(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return aevb(*args, env=env, unset=AUTH_SETTINGS, timeout=timeout)


def cluster_without_token(monkeypatch, head_node_args: dict, worker_cpus: Optional[int] = None):
    """A `ray.cluster_utils.Cluster` started without token authentication (and a worker node of `worker_cpus`),
    whatever this machine's token file says; RAY_AUTH_MODE is left unset for the test."""
    from ray.cluster_utils import Cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    head = Cluster(initialize_head=True, connect=False, head_node_args={"include_dashboard": False, **head_node_args})
    head.worker = head.add_node(num_cpus=worker_cpus) if worker_cpus else None
    head.wait_for_nodes()
    monkeypatch.delenv("RAY_AUTH_MODE")
    return head


def open_cluster_with_client_server(monkeypatch):
    """A Ray cluster started without token authentication (`ray.cluster_utils.Cluster`, one node of 1 CPU),
    its Ray Client server at `.client_address`."""
    client_port = free_port()
    head = cluster_without_token(monkeypatch, {"num_cpus": 1, "ray_client_server_port": client_port})
    head.client_address = f"ray://127.0.0.1:{client_port}"
    return head


@pytest.fixture
def open_cluster(monkeypatch):
    head = open_cluster_with_client_server(monkeypatch)
    yield head
    head.shutdown()


def client_server_logs(cluster) -> str:
    """The tails of the head's Ray Client server logs, where Ray writes why a client's server did not start."""
    logs = cluster.head_node.get_logs_dir_path()
    tails = []
    for name in sorted(os.listdir(logs)):
        if name.startswith("ray_client_server"):
            with open(os.path.join(logs, name), errors="replace") as f:
                tails.append(f"--- {name}\n" + f.read()[-1500:])
    return "\n".join(tails)


def test_an_address_where_nothing_listens_is_refused_at_once():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"nothing answers at ray.address={address} .*ray start --head"):
        choose_auth_mode(address)
    assert time.monotonic() - started < GCS_PROBE_TIMEOUT_S


@pytest.mark.slow
def test_a_cluster_without_token_authentication_is_joined_although_a_token_file_exists(
    open_cluster, tiny_data, tmp_path
):
    env = home_with_token(tmp_path, secrets.token_hex(32))
    proc = run_aevb(train_args(tiny_data, tmp_path, open_cluster.address, "open"), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done:" in proc.stderr
    # A RAY_AUTH_MODE that contradicts the cluster is one line, not a cancelled actor.
    proc = run_aevb(
        train_args(tiny_data, tmp_path, open_cluster.address, "forced"), {**env, "RAY_AUTH_MODE": "token"}, timeout=60
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "runs without token authentication: unset RAY_AUTH_MODE" in errors[0]


@pytest.mark.slow
def test_a_token_cluster_is_joined_with_its_token_and_a_wrong_or_missing_one_is_one_line(ray_head, tiny_data, tmp_path):
    proc = run_aevb(train_args(tiny_data, tmp_path, ray_head.gcs_address, "token"), ray_head.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done:" in proc.stderr
    wrong = home_with_token(tmp_path, secrets.token_hex(32))
    for env, says in [
        (wrong, f"refused the token in {wrong['HOME']}/.ray/auth_token"),
        ({"HOME": str(tmp_path)}, "uses token authentication and no token was found"),
    ]:
        started = time.monotonic()
        proc = run_aevb(train_args(tiny_data, tmp_path, ray_head.gcs_address, "refused"), env, timeout=60)
        assert time.monotonic() - started < 30
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = error_lines(proc.stderr)
        assert len(errors) == 1 and says in errors[0] and "ray get-auth-token" in errors[0], proc.stderr
    assert not os.path.exists(tmp_path / "runs" / "refused" / "lease.json")


@pytest.mark.slow
def test_a_ray_client_address_is_joined_the_way_its_cluster_is_set_up(open_cluster, ray_head, tiny_data, tmp_path):
    """ray://: the Ray Client server is asked as the GCS is. Ray alone, in the wrong mode, waits 30-40 s and
    fails in a traceback (token mode on an open cluster: "Starting Ray client server failed")."""
    with_token_file = home_with_token(tmp_path, secrets.token_hex(32))
    proc = run_aevb(train_args(tiny_data, tmp_path, open_cluster.client_address, "client"), with_token_file)
    assert proc.returncode == 0, proc.stderr[-3000:] + client_server_logs(open_cluster)
    assert "done:" in proc.stderr
    started = time.monotonic()
    proc = run_aevb(train_args(tiny_data, tmp_path, ray_head.client_address, "refused"), {"HOME": str(tmp_path)})
    assert time.monotonic() - started < 30
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "uses token authentication and no token was found" in errors[0], proc.stderr


class ClientServerKiller(threading.Thread):
    """Kills the first `times` Ray Client servers that `cluster`'s head starts for its clients, while each is still
    Ray's start-up shim (setup_worker.py): a client's server that dies at start, as Ray's has under load."""

    def __init__(self, cluster, times: int):
        super().__init__(daemon=True)
        self.marks = ("setup_worker", "--mode=specific-server", f"--address={cluster.gcs_address}")
        self.times, self.killed, self.stop = times, 0, threading.Event()

    def run(self):
        while self.killed < self.times and not self.stop.is_set():
            for proc in psutil.process_iter(["cmdline"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if all(mark in cmdline for mark in self.marks):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.kill()
                        self.killed += 1
            time.sleep(0.01)


@pytest.mark.slow
def test_a_ray_client_server_that_dies_at_start_is_tried_again_then_told_in_one_line(monkeypatch, tiny_data, tmp_path):
    # The head's proxier waits this long for a client's server that started and died before it served (Ray's
    # default 30 s): the third of the ways it fails that compat.ray_client_server_failed knows.
    monkeypatch.setenv("RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S", "15")  # read as the head starts
    open_cluster = open_cluster_with_client_server(monkeypatch)
    try:
        check_client_server_deaths(open_cluster, tiny_data, tmp_path)
    finally:
        open_cluster.shutdown()


def check_client_server_deaths(open_cluster, tiny_data, tmp_path):
    killer = ClientServerKiller(open_cluster, times=1)
    killer.start()
    proc = run_aevb(train_args(tiny_data, tmp_path, open_cluster.client_address, "again"), without_auth_settings())
    killer.stop.set()
    assert killer.killed == 1
    assert proc.returncode == 0, proc.stderr[-3000:] + client_server_logs(open_cluster)
    assert "Ray Client server (attempt 1 of 3); trying again" in proc.stderr and "done:" in proc.stderr
    killer = ClientServerKiller(open_cluster, times=RAY_CLIENT_JOIN_ATTEMPTS)
    killer.start()
    proc = run_aevb(train_args(tiny_data, tmp_path, open_cluster.client_address, "never"), without_auth_settings())
    killer.stop.set()
    assert killer.killed >= 1  # all, but where Ray's own failure came first (the reason for trying again)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "could not start this job's Ray Client server in 3 attempts" in errors[0], proc.stderr
    assert "ray_client_server_<port>.err" in errors[0]
    assert not os.path.exists(tmp_path / "runs" / "never" / "lease.json")


@pytest.mark.slow
def test_where_the_auth_mode_cannot_be_asked_a_failed_join_names_ray_auth_mode_and_the_token_path(tiny_data, tmp_path):
    """Over TLS (RAY_USE_TLS) the cluster is not asked; a join that fails says what to set, in one line."""
    address = f"ray://127.0.0.1:{free_port()}"
    proc = run_aevb(train_args(tiny_data, tmp_path, address, "tls"), {"RAY_USE_TLS": "1", "HOME": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and f"could not join the Ray cluster at {address}" in errors[0], proc.stderr
    assert "RAY_AUTH_MODE=token" in errors[0] and f"{tmp_path}/.ray/auth_token" in errors[0]


@pytest.mark.slow  # `aevb-dist train` starting up
def test_an_address_where_nothing_listens_is_one_line_from_the_command(tiny_data, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = aevb(*train_args(tiny_data, tmp_path, address, "nowhere"), timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and f"nothing answers at ray.address={address}" in errors[0], proc.stderr


@pytest.fixture
def cluster_of_one_worker_node(monkeypatch):
    """A head without CPUs and one worker node of 1 CPU, without token authentication: the training worker runs
    on a node of its own, away from the driver's."""
    head = cluster_without_token(monkeypatch, {"num_cpus": 0}, worker_cpus=1)
    yield head
    head.shutdown()


def fail_mid_run(tiny_data, tmp_path, address: str, name: str, fault, undo=lambda: None) -> tuple[int, str, str, float]:
    """`aevb-dist train` on the cluster at `address`; `fault()` once its first checkpoint is in the run folder,
    `undo()` when the command has ended. (exit code, stderr, run folder, seconds from the fault to the end)."""
    from aevb_dist.run import checkpoint, storage
    from tests.faults import SLOW, wait_for

    slow = [f"{key}={value}" for key, value in {**SLOW, "train.max_steps": 100000}.items()]  # later keys win
    args = train_args(tiny_data, tmp_path, address, name, *slow)
    fs, path = storage.resolve(str(tmp_path / "runs" / name))
    env = {k: v for k, v in without_auth_settings().items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "aevb_dist", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: driver.poll() is not None or checkpoint.latest(fs, path) is not None, timeout=180)
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        fault()
        faulted = time.monotonic()
        _, stderr = driver.communicate(timeout=120)
        took = time.monotonic() - faulted
    finally:
        driver.kill()
        undo()
    assert not os.path.exists(f"{path}/lease.json")  # released: a rerun is not refused
    checkpoint.load(fs, checkpoint.latest(fs, path))  # the newest complete checkpoint is whole
    return driver.returncode, stderr, path, took


@pytest.mark.slow
def test_a_head_that_stops_answering_mid_run_ends_the_command_in_one_line_keeping_the_checkpoint(
    cluster_of_one_worker_node, tiny_data, tmp_path
):
    head = cluster_of_one_worker_node
    gcs = psutil.Process(head.head_node.all_processes["gcs_server"][0].process.pid)
    # The head's GCS stops answering (stopped, not killed: its port still takes connections). The driver's
    # raylet stays up meanwhile; Ray's driver alone would wait 60 s, then die in a C++ log.
    code, stderr, _, took = fail_mid_run(
        tiny_data,
        tmp_path,
        head.address,
        "headless",
        lambda: gcs.send_signal(signal.SIGSTOP),
        lambda: gcs.send_signal(signal.SIGCONT),
    )
    assert took < 45
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    errors = error_lines(stderr)
    assert len(errors) == 1 and "head at" in errors[0] and "stopped answering" in errors[0], stderr[-3000:]


@pytest.mark.slow
def test_a_raylet_that_dies_mid_run_ends_the_command_in_one_line_keeping_the_checkpoint(
    cluster_of_one_worker_node, tiny_data, tmp_path
):
    """The raylet of the training worker's node killed (the node's other processes, and the head, stay)."""
    head = cluster_of_one_worker_node
    raylet = psutil.Process(head.worker.all_processes["raylet"][0].process.pid)
    code, stderr, path, took = fail_mid_run(tiny_data, tmp_path, head.address, "raylet", raylet.kill)
    assert took < 90
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    errors = error_lines(stderr)
    assert len(errors) == 1 and f"{path} keeps its newest complete checkpoint" in errors[0], stderr[-3000:]
    assert "run the same command again" in errors[0]


@pytest.mark.slow
def test_a_worker_group_the_cluster_cannot_hold_is_one_line_at_once(open_cluster, tiny_data, tmp_path):
    started = time.monotonic()
    proc = run_aevb(
        train_args(tiny_data, tmp_path, open_cluster.address, "crowded", "train.num_workers=3"), {}, timeout=120
    )
    assert time.monotonic() - started < 30  # Ray Train alone would wait for room forever
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "has room for 1 worker(s) of 1 CPU" in errors[0], proc.stderr
    assert "train.num_workers=3 are needed" in errors[0]
