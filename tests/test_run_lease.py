"""One writer per run: a live lease refuses a second writer, a dead one is taken over, a lost one stops the run."""

import os
import signal
import subprocess
import sys
import time

import pytest

from aevb_dist import storage
from aevb_dist.run_lease import LEASE, LeaseHeld, RunLease
from tests.faults import wait_for
from tests.helpers import SMOKE, aevb, tiny_overrides

HOLDER = """
import sys, time
from aevb_dist import storage
from aevb_dist.run_lease import RunLease
lease = RunLease(storage.Folder.open(sys.argv[1], sys.argv[2] or None), float(sys.argv[3]))
lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_lease(run_uri: str, timeout_s: float, endpoint: str = "") -> subprocess.Popen:
    """Another process holding the run's lease, heartbeat and all, until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run_uri, endpoint, str(timeout_s)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def run_uri_for(kind: str, tmp_path, request) -> tuple[str, str]:
    if kind == "local":
        return str(tmp_path / "run"), ""
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://aevb-test/lease-{os.path.basename(tmp_path)}/run", endpoint


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_live_lease_refuses_a_second_writer_and_a_dead_one_is_taken_over(kind, tmp_path, request, capsys):
    uri, endpoint = run_uri_for(kind, tmp_path, request)
    run = storage.Folder.open(uri, endpoint or None)
    holder = hold_lease(uri, 2.0, endpoint)
    try:
        time.sleep(3.0)  # longer than the timeout: only the holder's heartbeat keeps the lease live
        with pytest.raises(LeaseHeld, match=rf"is being trained by pid {holder.pid} on .*use another run.name"):
            RunLease(run, 2.0).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(2.5)  # the killed holder's heartbeat goes stale
    taker = RunLease(run, 2.0)
    taker.acquire()
    assert f"taking over {uri} from pid {holder.pid}" in capsys.readouterr().err
    with pytest.raises(LeaseHeld):
        RunLease(run, 2.0).acquire()
    taker.release()
    assert not run.fs.exists(run.file(LEASE))
    with RunLease(run, 2.0):  # a finished run's folder is free at once
        pass


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_lease_writes_are_conditional(kind, tmp_path, request):
    """Create only where absent, replace only the version read: of two writers racing, one wins."""
    from aevb_dist.run_lease import _LocalLeaseFile, _S3LeaseObject

    uri, endpoint = run_uri_for(kind, tmp_path, request)
    run = storage.Folder.open(uri, endpoint or None)
    run.fs.makedirs(run.path, exist_ok=True)
    lease = _LocalLeaseFile(run.file(LEASE)) if kind == "local" else _S3LeaseObject(run.fs, run.file(LEASE))
    first = lease.write_if({"owner": "a"}, None)
    assert first is not None and lease.write_if({"owner": "b"}, None) is None
    second = lease.write_if({"owner": "a", "beat": 2}, first)
    assert second is not None and lease.write_if({"owner": "b"}, first) is None
    assert lease.read() == ({"owner": "a", "beat": 2}, second)


def test_a_lease_taken_from_a_live_writer_stops_it(tmp_path):
    run = storage.Folder.open(str(tmp_path / "run"))
    lost = []
    lease = RunLease(run, 1.0, on_lost=lost.append)
    lease.acquire()
    with open(run.file(LEASE), "w") as f:  # what a taker that found it stale would have written
        f.write('{"id": "another", "host": "elsewhere", "pid": 1, "heartbeat": %f}' % time.time())
    wait_for(lambda: lost, timeout=5)
    assert "another run took over this run's lease" in lost[0]
    lease.release()
    assert run.fs.exists(run.file(LEASE))  # the new owner's lease is left alone


@pytest.mark.slow  # `aevb-dist train` starting up
def test_train_refuses_a_run_another_driver_holds_and_writes_nothing(tiny_data, tmp_path):
    holder = hold_lease(str(tmp_path / "busy"), 30.0)
    try:
        proc = aevb("train", SMOKE, *tiny_overrides(tiny_data, str(tmp_path)), "run.name=busy",
                    "ray.local_mode=true", timeout=120)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"is being trained by pid {holder.pid}" in errors[0], proc.stderr
    assert sorted(os.listdir(tmp_path / "busy")) == [LEASE, f"{LEASE}.lock"]  # no config, metrics or checkpoint
