"""One writer per run: a live lease refuses a second writer, a dead one is taken over, a lost one stops the run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from aevb_dist.run import lease, storage
from aevb_dist.run.lease import LEASE, WRITER, LeaseHeld, RunLease, process_identity
from tests.faults import wait_for
from tests.helpers import SMOKE, aevb, tiny_overrides

HOLDER = """
import sys, time
from aevb_dist.run import storage
from aevb_dist.run.lease import RunLease
lease = RunLease(storage.Folder.open(sys.argv[1], sys.argv[2] or None), float(sys.argv[3]))
lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_lease(run_uri: str, timeout_s: float, endpoint: str = "") -> subprocess.Popen:
    """Another process holding the run's lease, heartbeat and all, until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, run_uri, endpoint, str(timeout_s)], stdout=subprocess.PIPE, text=True
    )
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
    taker = RunLease(run, 2.0)  # at once: on its own machine, a dead owner is seen by its pid
    taker.acquire()
    assert (
        f"taking over {uri} from pid {holder.pid} on {socket.gethostname()}, which is no longer running"
        in capsys.readouterr().err
    )
    with pytest.raises(LeaseHeld):
        RunLease(run, 2.0).acquire()
    taker.release()
    assert not run.fs.exists(run.file(LEASE))
    with RunLease(run, 2.0):  # a finished run's folder is free at once
        pass


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_lease_writes_are_conditional(kind, tmp_path, request):
    """Create only where absent, replace only the version read: of two writers racing, one wins."""
    from aevb_dist.run.lease import _LocalLeaseFile, _S3LeaseObject

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
        proc = aevb(
            "train",
            SMOKE,
            *tiny_overrides(tiny_data, str(tmp_path)),
            "run.name=busy",
            "ray.local_mode=true",
            timeout=120,
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"is being trained by pid {holder.pid}" in errors[0], proc.stderr
    assert sorted(os.listdir(tmp_path / "busy")) == [LEASE, f"{LEASE}.lock"]  # no config, metrics or checkpoint


def write_lease(run: storage.Folder, age_s: float, timeout_s: float, **owner) -> None:
    """A lease as another driver would have left it, last renewed `age_s` ago."""
    run.fs.makedirs(run.path, exist_ok=True)
    record = {
        "id": "earlier",
        **process_identity(),
        "started": time.time() - 100,
        **owner,
        "heartbeat": time.time() - age_s,
        "timeout_s": timeout_s,
    }
    run.fs.pipe_file(run.file(LEASE), json.dumps(record).encode())


def test_a_reused_pid_is_a_dead_owner_and_a_live_owner_is_refused_however_old_its_beat(tmp_path, capsys):
    run = storage.Folder.open(str(tmp_path / "run"))
    # The recorded pid is alive (this very process) but started at another time: the owner is gone.
    write_lease(run, age_s=1.0, timeout_s=600.0, pid=os.getpid(), pid_start=process_identity()["pid_start"] - 7)
    with RunLease(run, 600.0):
        pass
    assert "which is no longer running" in capsys.readouterr().err
    # A live owner whose heartbeat stalled (stopped, not dead) is refused at once, not waited out.
    holder = hold_lease(str(tmp_path / "run"), 2.0)
    try:
        holder.send_signal(signal.SIGSTOP)
        time.sleep(1.5)  # beyond one beat (0.5 s), within the timeout
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match=f"is being trained by pid {holder.pid}"):
            RunLease(run, 2.0).acquire()
        assert time.monotonic() - started < 1.0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_stale_lease_of_another_machine_is_waited_out_or_refused_with_no_wait(tmp_path, capsys):
    run = storage.Folder.open(str(tmp_path / "run"))
    elsewhere = {"host": "another-host", "machine": "other", "pid": 4242, "pid_start": 1}
    write_lease(run, age_s=4.0, timeout_s=7.0, **elsewhere)  # missed its beats (every 1.75 s)
    with pytest.raises(LeaseHeld, match=r"heartbeat stopped \(4 s ago\); it can be taken over in 3 s .*--no-wait"):
        RunLease(run, 7.0, wait=False).acquire()
    started = time.monotonic()
    with RunLease(run, 7.0):
        waited = time.monotonic() - started
    err = capsys.readouterr().err
    assert 2.0 <= waited < 6.0, waited
    assert "pid 4242 on another-host, whose heartbeat stopped" in err and "waiting up to 3 s" in err
    assert "taking over" in err
    # One still beating is refused at once.
    write_lease(run, age_s=0.5, timeout_s=7.0, **elsewhere)
    with pytest.raises(LeaseHeld, match="is being trained by pid 4242 on another-host"):
        RunLease(run, 7.0).acquire()


def test_a_lease_whose_heartbeat_comes_back_while_waited_for_is_refused(tmp_path):
    run = storage.Folder.open(str(tmp_path / "run"))
    elsewhere = {"host": "another-host", "machine": "other", "pid": 4242, "pid_start": 1}
    write_lease(run, age_s=5.0, timeout_s=10.0, **elsewhere)  # beats every 2.5 s: it missed one
    beat = threading.Timer(1.5, lambda: write_lease(run, age_s=0.0, timeout_s=10.0, **elsewhere))
    beat.start()
    try:
        with pytest.raises(LeaseHeld, match="its heartbeat came back"):
            RunLease(run, 10.0).acquire()
    finally:
        beat.cancel()


def test_a_dead_drivers_writer_is_made_sure_gone_before_the_run_is_taken_over(tmp_path, capsys, monkeypatch):
    run = storage.Folder.open(str(tmp_path / "run"))
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_lease(run, age_s=1.0, timeout_s=600.0, pid=orphan.pid + 10**6, pid_start=1)  # no such pid
        run.fs.pipe_file(run.file(WRITER), json.dumps(process_identity(orphan.pid)).encode())
        monkeypatch.setattr(lease, "WRITER_EXIT_WAIT_S", 1.0)
        with RunLease(run, 600.0):
            assert orphan.poll() == -signal.SIGKILL or orphan.wait(5) == -signal.SIGKILL
            assert not run.fs.exists(run.file(WRITER))  # the gone writer's record is not the new run's
        err = capsys.readouterr().err
        assert f"stopping pid {orphan.pid}, which still writes into" in err and "no longer running" in err
        # A writer on another machine cannot be checked from here: the heartbeat is waited out instead.
        write_lease(run, age_s=2.0, timeout_s=4.0, pid=orphan.pid + 10**6, pid_start=1)
        run.fs.pipe_file(run.file(WRITER), json.dumps({"host": "another-host", "pid": 7}).encode())
        with pytest.raises(LeaseHeld, match="whose writer ran on another machine"):
            RunLease(run, 4.0, wait=False).acquire()
    finally:
        orphan.kill()
        orphan.wait()


@pytest.mark.slow  # `aevb-dist train` starting up
def test_sigterm_ends_the_command_while_it_waits_for_a_lease(tiny_data, tmp_path):
    run = storage.Folder.open(str(tmp_path / "waited"))
    write_lease(run, age_s=300.0, timeout_s=600.0, host="another-host", machine="other", pid=4242, pid_start=1)
    held = run.fs.cat_file(run.file(LEASE))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aevb_dist",
            "train",
            SMOKE,
            *tiny_overrides(tiny_data, str(tmp_path)),
            "run.name=waited",
            "ray.local_mode=true",
            "run.lease_timeout_s=600",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        said = proc.stderr.readline()
        assert re.search(r"whose heartbeat stopped \(\d+ s ago\): waiting up to 29\d s", said), said
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "aevb-dist train: interrupted" in rest, rest  # 128 + SIGTERM
    assert run.fs.cat_file(run.file(LEASE)) == held  # the other machine's lease is left as it was
