"""`ray.local_mode=true`: the workers as processes of this machine, supervised by the command, with no Ray.
Same math and run folder as a run on Ray: bit-exact resume across modes, checkpoints kept, failures
answered in one line. (A killed worker and a killed driver: tests/test_reliability.py, both modes.)"""

import signal
import subprocess
import sys
import threading

import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.run import checkpoint, storage
from aevb_dist.run.metrics import read_metrics
from aevb_dist.train.driver import train
from tests.faults import SLOW, capture_errors, logged_step, our_local_workers, wait_for
from tests.helpers import SMOKE, assert_bitwise_equal, final_state, tiny_overrides

pytestmark = pytest.mark.slow  # worker processes of local mode, and Ray

LOCAL = {"ray.local_mode": "true", "train.num_workers": 2, "train.batch_size_per_worker": 16}


def test_a_run_moves_between_ray_and_local_mode_bit_for_bit(ray_local, tiny_data, tmp_path):
    local = tiny_overrides(tiny_data, str(tmp_path), **LOCAL)
    on_ray = tiny_overrides(tiny_data, str(tmp_path), **{**LOCAL, "ray.local_mode": "false"})
    train(load_config(SMOKE, local + ["run.name=straight", "train.max_steps=34"]))
    train(load_config(SMOKE, on_ray + ["run.name=mixed", "train.max_steps=13"]))  # stops mid-epoch
    train(load_config(SMOKE, local + ["run.name=mixed", "train.max_steps=30"]))
    fs, path = storage.resolve(f"{tmp_path}/mixed")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path) if "checkpoint_0" in p)
    # smoke.yaml's checkpoint.keep_last=2: local mode pruned what Ray Train had kept (12, 13) too.
    assert names == [checkpoint.checkpoint_name(28), checkpoint.checkpoint_name(30)]
    last = train(load_config(SMOKE, on_ray + ["run.name=mixed", "train.max_steps=34"]))  # and back on Ray
    straight, mixed = final_state(f"{tmp_path}/straight"), final_state(f"{tmp_path}/mixed")
    assert mixed["state"]["epoch"] >= 1  # the run crossed epoch boundaries
    assert_bitwise_equal(straight, mixed)
    steps = [row["step"] for row in read_metrics(fs, f"{path}/metrics.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == 34 and {13, 30} <= set(steps)
    assert last["step"] == 34 and last["test_elbo"] == last["test_elbo"]  # evaluated, not NaN
    # Under both launchers rank 0 writes and prunes the checkpoints: keep_last=2 of them, whoever wrote the rest.
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path) if "checkpoint_0" in p)
    assert names == [checkpoint.checkpoint_name(s) for s in (32, 34)]


def test_failures_in_local_mode_are_one_line_and_not_retried_forever(tiny_data, tmp_path):
    args = [
        sys.executable,
        "-m",
        "aevb_dist",
        "train",
        SMOKE,
        *tiny_overrides(tiny_data, str(tmp_path), **{**LOCAL, "train.max_failures": 1}),
        "run.name=diverge",
        "optim.name=sgd",
        "optim.lr=1e30",
        "train.max_steps=8",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "aevb-dist train: error:" in line]
    assert len(errors) == 1 and "non-finite objective or gradient at step" in errors[0], proc.stderr[-3000:]
    assert "restarting all 2 from the newest checkpoint (restart 1 of 1)" in proc.stderr
    with pytest.raises(ValueError, match="ray.local_mode=true .* cannot join ray.address=auto"):
        load_config(SMOKE, ["ray.local_mode=true", "ray.address=auto"])
    # A worker killed with no restarts left: the run fails naming the signal, not hanging.
    cfg = load_config(SMOKE, tiny_overrides(tiny_data, str(tmp_path), **{**SLOW, **LOCAL}) + ["run.name=k"])
    errors = []
    runner = threading.Thread(target=lambda: capture_errors(errors, train, cfg))
    runner.start()
    wait_for(lambda: logged_step(f"{tmp_path}/k") >= 20)
    our_local_workers()[0].send_signal(signal.SIGKILL)
    runner.join(timeout=120)
    assert not runner.is_alive() and len(errors) == 1
    assert isinstance(errors[0], RuntimeError) and "SIGKILL" in str(errors[0]), errors
    wait_for(lambda: not our_local_workers(), timeout=30)  # the other worker was stopped, not left behind


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    fs, run = storage.resolve(str(tmp_path))
    state = {"model": {"w": torch.zeros(2)}, "state": {"step": 0}}
    for step in (4, 8, 12, 16):
        folder = tmp_path / "staging"
        folder.mkdir()
        checkpoint.save(str(folder), {**state, "state": {"step": step}}, {"model": {}})
        checkpoint.upload(str(folder), fs, f"{run}/{checkpoint.checkpoint_name(step)}")
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    fs.rm(f"{run}/{checkpoint.checkpoint_name(16)}/{checkpoint.MANIFEST}")  # cut off before its manifest
    removed = checkpoint.prune(fs, run, keep=2)
    assert removed == [checkpoint.checkpoint_name(4)]
    assert checkpoint.latest(fs, run).endswith(checkpoint.checkpoint_name(12))
    assert checkpoint.prune(fs, run, keep=2) == []
    assert checkpoint.prune(fs, run, keep=1) == [checkpoint.checkpoint_name(8)]


def test_the_command_exits_quickly_yet_flushed_and_clean(tiny_data, tmp_path):
    """`aevb-dist` skips the interpreter's teardown at exit (console_main): everything it printed still
    arrives through a pipe, its exit code is main's, and the exit handlers it does not skip ran (the fork
    server's temporary folder is removed, the server itself is gone)."""
    import os

    import psutil

    temp = tmp_path / "tmp"
    temp.mkdir()
    args = [
        sys.executable,
        "-m",
        "aevb_dist",
        "train",
        SMOKE,
        "run.name=quick",
        "train.max_steps=4",
        *tiny_overrides(tiny_data, str(tmp_path), **LOCAL),
    ]
    env = {**os.environ, "TMPDIR": str(temp)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    servers = []
    while proc.poll() is None and not servers:  # local mode's fork server, started by the command
        servers = [p for p in psutil.Process(proc.pid).children() if "forkserver" in " ".join(p.cmdline())]
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith("aevb-dist: done:"), err[-3000:]
    assert servers and not any(s.is_running() and s.status() != psutil.STATUS_ZOMBIE for s in servers)
    assert not list(temp.glob("pymp-*")), list(temp.iterdir())
    # A user's mistake: exit code 2 and the one line, through the same quick exit.
    proc = subprocess.run([*args, "train.max_steps=-3"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "aevb-dist train: error:" in proc.stderr, proc.stderr[-3000:]
