import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pytest

from tests.helpers import free_port
from tests.s3_server import start_moto

# Everything stays on loopback: the embedded Ray, gloo, the S3 server.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# Credentials for the local S3 server only; set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "aevb-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "aevb-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


# The files whose tests take minutes, longest first (measured with `pytest --durations=0`). pytest-xdist hands out
# whole files in collection order (`--no-loadscope-reorder`): started first, none of them is left running alone
# at the end while the other process idles. A stale list costs time, never a test.
LONGEST_FIRST = (
    "test_joining_clusters.py",
    "test_sweep.py",
    "test_multinode.py",
    "test_reliability.py",
    "test_submit.py",
    "test_storage_outage.py",
    "test_marginal_estimators.py",
    "test_full_disk.py",
    "test_stop.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="module")  # shut down after its module: later modules' runs start (or refuse) their own
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """300 examples of 16 pixels in [0, 1] with some structure, as sharded Parquet (270 train / 30 test)."""
    from aevb_dist.data.prepare import prepare

    rng = np.random.default_rng(0)
    proto = rng.random((4, 16))
    x = np.clip(proto[rng.integers(0, 4, 300)] + 0.1 * rng.standard_normal((300, 16)), 0, 1)
    folder = tmp_path_factory.mktemp("tiny")
    np.save(folder / "x.npy", x.astype(np.float32))
    prepare(str(folder / "x.npy"), str(folder / "pq"), num_shards=3, rows_per_row_group=16, report=lambda m: None)
    return str(folder / "pq")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, with a bucket `aevb-test`."""
    proc, endpoint = start_moto("aevb-test")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@dataclass(frozen=True)
class RayHead:
    address: str  # the job server, http://127.0.0.1:PORT
    env: dict  # what a client on this machine has: HOME holds the head's token, as `ray start` left it
    temp_dir: str  # the head's session folder, logs included
    gcs_address: str  # what `ray.address` joins: 127.0.0.1:PORT
    client_address: str  # its Ray Client server: ray://127.0.0.1:PORT


@pytest.fixture(scope="module")  # not session-long: its dozen idle processes shared 2 cores with later modules
def ray_head(tmp_path_factory):
    """A real Ray head (`ray start --head --block`) on 127.0.0.1 with its job server and token
    authentication on, as a default head runs where a token exists (~/.ray/auth_token). Its HOME is a
    folder of its own, so this machine's token is left alone; clients get the same HOME. Stopped afterwards."""
    import requests

    home = tmp_path_factory.mktemp("rayhome")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    # Not under pytest's tmp_path: Ray's socket paths under it must stay within AF_UNIX's 107 bytes, and
    # pytest-xdist's popen-gwN folders made them longer.
    temp_dir = tempfile.mkdtemp(prefix="aevb-rayhead-")
    head_output = open(os.path.join(temp_dir, "ray-start.out"), "w")
    port, dashboard, client = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["HOME"] = str(home)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")  # the ray of this interpreter
    proc = subprocess.Popen(
        [
            ray_cli if os.path.exists(ray_cli) else "ray",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
            # Fixed default ports (52365 for the job agent...) may still be held by an earlier
            # test's Ray; a head whose agent cannot bind answers every job "No available agent".
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={client}",
            f"--temp-dir={temp_dir}",
        ],
        stdout=head_output,
        stderr=subprocess.STDOUT,
        env=env,
    )
    address = f"http://127.0.0.1:{dashboard}"
    token = (home / ".ray" / "auth_token").read_text()
    deadline, head_answers = time.time() + 90, False
    while not head_answers and time.time() < deadline:
        try:
            head_answers = requests.get(
                f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=1
            ).ok
        except requests.RequestException:
            pass
        if not head_answers:
            time.sleep(0.5)
    try:
        if not head_answers:
            with open(head_output.name, errors="replace") as f:
                raise RuntimeError(f"the Ray head did not start within 90 s; `ray start` said:\n{f.read()[-3000:]}")
        yield RayHead(address, {"HOME": str(home)}, temp_dir, f"127.0.0.1:{port}", f"ray://127.0.0.1:{client}")
    finally:
        stop_process_tree(proc)
        head_output.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_process_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to `proc` (`ray start --block` then stops its node), and SIGKILL after `grace_s` to it and every
    process it had started: a head whose jobs and clients came and went can take 30 s to stop gracefully."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
