"""Joining a Ray cluster the way it is set up, and Ray's failures told in one line within a bounded time:
real heads with and without token authentication, a token file present either way."""

import os
import secrets
import signal
import subprocess
import sys
import time

import psutil
import pytest

from aevb_dist.ray_runtime import GCS_PROBE_TIMEOUT_S, choose_auth_mode
from tests.helpers import SMOKE, aevb, error_lines, free_port, tiny_overrides


def home_with_token(tmp_path, token: str) -> dict:
    """A HOME whose ~/.ray/auth_token holds `token`, as `ray start --head` leaves one on any machine."""
    home = tmp_path / f"home-{secrets.token_hex(4)}"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token)
    return {"HOME": str(home)}


def without_auth_settings() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}


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
    env = {**{k: v for k, v in without_auth_settings().items() if k != "RAY_ADDRESS"}, **env}
    return subprocess.run(
        [sys.executable, "-m", "aevb_dist", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture
def open_cluster(monkeypatch):
    """A Ray cluster started without token authentication (`ray.cluster_utils.Cluster`, one node of 1 CPU)."""
    from ray.cluster_utils import Cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    head = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    head.wait_for_nodes()
    monkeypatch.delenv("RAY_AUTH_MODE")
    yield head
    head.shutdown()


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


@pytest.mark.slow  # `aevb-dist train` starting up
def test_an_address_where_nothing_listens_is_one_line_from_the_command(tiny_data, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = aevb(*train_args(tiny_data, tmp_path, address, "nowhere"), timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and f"nothing answers at ray.address={address}" in errors[0], proc.stderr


@pytest.mark.slow
def test_a_head_that_stops_answering_mid_run_ends_the_command_in_one_line_keeping_the_checkpoint(
    tiny_data, tmp_path, monkeypatch
):
    from ray.cluster_utils import Cluster

    from aevb_dist import checkpoint, storage
    from tests.faults import SLOW, wait_for

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    head = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    head.add_node(num_cpus=1)
    head.wait_for_nodes()
    monkeypatch.delenv("RAY_AUTH_MODE")
    gcs = psutil.Process(head.head_node.all_processes["gcs_server"][0].process.pid)
    try:
        args = [
            "train",
            SMOKE,
            *tiny_overrides(
                tiny_data,
                str(tmp_path / "runs"),
                **{**SLOW, "train.num_workers": 1, "train.cpus_per_worker": 1, "train.max_steps": 100000},
            ),
            "run.name=headless",
            f"ray.address={head.address}",
        ]
        fs, path = storage.resolve(str(tmp_path / "runs" / "headless"))
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
            # The head's GCS stops answering (stopped, not killed: its port still takes connections). The
            # driver's raylet stays up meanwhile; Ray's driver alone would wait 60 s, then die in a C++ log.
            gcs.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            _, stderr = driver.communicate(timeout=120)
        finally:
            driver.kill()
        assert time.monotonic() - stopped < 45
    finally:
        gcs.send_signal(signal.SIGCONT)
        head.shutdown()
    assert driver.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    errors = error_lines(stderr)
    assert len(errors) == 1 and "head at" in errors[0] and "stopped answering" in errors[0], stderr[-3000:]
    assert not os.path.exists(f"{path}/lease.json")
    checkpoint.load(fs, checkpoint.latest(fs, path))


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
