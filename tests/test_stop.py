"""Ctrl-C or SIGTERM of `aevb-dist train`: the workers checkpoint the next step and the command exits, saying
so; a rerun resumes from that step and ends bit for bit where an uninterrupted run ends. (A preemption
notice on a Ray node: tests/test_multinode.py.)"""

import os
import signal
import time

import psutil
import pytest

from aevb_dist.config import load_config
from aevb_dist.run import checkpoint, storage
from aevb_dist.train.driver import train
from tests.faults import SLOW, logged_step, wait_for
from tests.helpers import SMOKE, assert_bitwise_equal, final_state, start_train, tiny_overrides

pytestmark = pytest.mark.slow  # worker processes, and the embedded Ray

LOCAL = {"ray.local_mode": "true", "train.num_workers": 2}


def _stopped_run(overrides: list[str], run_dir: str, send, signum: int) -> tuple[str, int, int]:
    """Start a run, signal it (send(proc)) once it has logged step 20, and return (stderr, the step logged
    when the signal went, the step of its newest checkpoint). The command exits as that signal's conventional
    status (128 + its number), the run unfinished."""
    proc = start_train(overrides)
    try:
        wait_for(lambda: logged_step(run_dir) >= 20 or proc.poll() is not None, timeout=240)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        seen = logged_step(run_dir)
        send(proc)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, err[-3000:]
    fs, path = storage.resolve(run_dir)
    return err, seen, checkpoint.manifest_step(fs, checkpoint.latest(fs, path))


@pytest.mark.parametrize(
    "launcher,signum",
    [("local-mode", signal.SIGTERM), ("embedded-ray", signal.SIGINT), ("embedded-ray", signal.SIGTERM)],
)
def test_a_signal_checkpoints_the_next_step_and_a_rerun_ends_bit_for_bit(tiny_data, tmp_path, launcher, signum):
    """SIGTERM to the command (what a scheduler sends), or Ctrl-C to its process group (what a terminal does:
    the workers get it too, and leave it to the driver); on the embedded Ray both."""
    local = launcher == "local-mode"
    extra = {**SLOW, **LOCAL, "ray.local_mode": str(local).lower(), "checkpoint.every_steps": 500}
    overrides = tiny_overrides(tiny_data, str(tmp_path), **extra)

    def send(proc):
        if signum == signal.SIGTERM:
            proc.send_signal(signum)  # to the command only (ray.init's own SIGTERM handler must not win)
        else:
            os.killpg(proc.pid, signum)

    err, seen, saved = _stopped_run(overrides + ["run.name=stopped"], f"{tmp_path}/stopped", send, signum)
    name = signal.Signals(signum).name
    assert f"{name}: stopping after the next step" in err, err[-3000:]
    # Within a poll of the request (2 s) and a step of it: far from a checkpoint interval (500 steps).
    assert seen <= saved < 500, (seen, saved)
    assert f"stopped at step {saved} of 600, with a checkpoint of it" in err and "Traceback" not in err
    assert logged_step(f"{tmp_path}/stopped") == saved  # metrics.csv ends at the checkpoint: nothing to redo
    fs, path = storage.resolve(f"{tmp_path}/stopped")
    assert not fs.exists(f"{path}/stop_request.json")  # answered, and removed
    end = ["train.max_steps=" + str(saved + 12)]
    train(
        load_config(
            SMOKE,
            tiny_overrides(tiny_data, str(tmp_path), **{**extra, "ray.local_mode": "true"})
            + ["run.name=stopped"]
            + end,
        )
    )
    train(
        load_config(
            SMOKE,
            tiny_overrides(tiny_data, str(tmp_path), **{**extra, "ray.local_mode": "true"})
            + ["run.name=straight"]
            + end,
        )
    )
    assert_bitwise_equal(final_state(f"{tmp_path}/straight"), final_state(f"{tmp_path}/stopped"))


def _children(pid: int) -> list[psutil.Process]:
    """Every process `pid` started (Ray's, the workers), and theirs."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_embedded_rays_start_up_stops_at_once_with_nothing_trained(tiny_data, tmp_path, signum):
    """Ctrl-C (to the process group, as a terminal sends it) or SIGTERM while the embedded Ray starts: the
    command stops within seconds, with the signal's exit status and no step taken, and leaves no process."""
    overrides = tiny_overrides(tiny_data, str(tmp_path), **{**SLOW, "train.num_workers": 2}) + ["run.name=early"]
    proc = start_train(overrides)
    try:
        # Ray's own processes are starting: the driver is past its checks and inside the launch.
        wait_for(
            lambda: proc.poll() is not None or any("gcs_server" in p.name() for p in _children(proc.pid)),
            timeout=120,
            interval=0.2,
        )
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        started = _children(proc.pid)
        signalled = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-3000:]
    assert f"{name} before training's first logged step: stopping now, with nothing to checkpoint" in err, err[-3000:]
    assert "Traceback" not in err and "samples/s" not in err and took < 20, (took, err[-3000:])
    fs, path = storage.resolve(f"{tmp_path}/early")
    assert checkpoint.latest(fs, path) is None and logged_step(f"{tmp_path}/early") == 0
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.name() for p in alive]
