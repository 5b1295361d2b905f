"""A full disk is not an outage: a real tmpfs as the run folder (or the staging folder, or a dataset's
destination), filled for real. Nothing is retried; the run stops in one line naming the folder and the
space needed, its lease released, its newest complete checkpoint loadable; a rerun with room resumes."""

import contextlib
import errno
import os
import subprocess
import sys
import time

import pytest
import torch

from aevb_dist.run import checkpoint, storage
from aevb_dist.run.lease import LEASE
from aevb_dist.train import worker
from tests.faults import SLOW, logged_step, wait_for
from tests.helpers import SMOKE, aevb, error_lines, tiny_overrides


@contextlib.contextmanager
def small_disk(folder, size: str):
    """A tmpfs of `size` mounted at `folder` (root only; skipped where mounting is not allowed)."""
    os.makedirs(folder, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: str, leave: int = 0) -> str:
    """Write zeros into `folder` until its disk is full, then give `leave` bytes back; the filler's path."""
    path = os.path.join(folder, "filler")
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    os.truncate(path, max(os.path.getsize(path) - leave, 0))
    return path


@pytest.mark.slow
def test_a_full_run_folder_stops_the_run_in_one_line_and_a_rerun_with_room_resumes(tiny_data, tmp_path):
    """In local mode: rank 0 writes the run folder under either launcher, and a worker's error reaches the
    command as one line under the embedded Ray too (test_reliability's diverging run)."""
    with small_disk(tmp_path / "disk", "16m") as disk:
        args = [
            "train",
            SMOKE,
            *tiny_overrides(tiny_data, disk, **{**SLOW, "train.max_steps": 100000, "checkpoint.every_steps": 200}),
            "run.name=full",
            "ray.local_mode=true",
            "run.storage_retry_s=300",
        ]
        run_dir = f"{disk}/full"
        fs, path = storage.resolve(run_dir)
        driver = subprocess.Popen(
            [sys.executable, "-m", "aevb_dist", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for(lambda: driver.poll() is not None or checkpoint.latest(fs, path) is not None, timeout=180)
            assert driver.poll() is None, driver.stderr.read()[-3000:]
            filler = fill(disk, leave=256 * 1024)  # room for metrics rows, not for a checkpoint (~1.2 MiB)
            filled_at = time.monotonic()
            _, stderr = driver.communicate(timeout=120)  # not run.storage_retry_s (300 s) of retries
        finally:
            driver.kill()
        assert time.monotonic() - filled_at < 100
        assert driver.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
        errors = error_lines(stderr)
        assert len(errors) == 1 and f"no space left in {run_dir}" in errors[0], stderr[-3000:]
        assert "needs about" in errors[0] and "MiB free" in errors[0] and "run the same command again" in errors[0]
        assert "retrying" not in stderr
        assert stderr.count("could not renew the lease") <= 1  # one warning per cause, not one per heartbeat
        assert not os.path.exists(f"{run_dir}/{LEASE}")  # released
        newest = checkpoint.latest(fs, path)
        checkpoint.load(fs, newest)  # the newest complete checkpoint stays loadable
        saved = checkpoint.manifest_step(fs, newest)
        # No cut-off checkpoint is left to be resumed from, or to hold the room.
        assert all(
            checkpoint.verify(fs, f"{path}/{name}") is None
            for name in os.listdir(run_dir)
            if name.startswith("checkpoint_")
        )
        os.remove(filler)
        end = saved + 200
        again = aevb(*args, f"train.max_steps={end}", timeout=300)  # in local mode too
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resuming full from {checkpoint.checkpoint_name(saved)}" in again.stderr
        assert checkpoint.manifest_step(fs, checkpoint.latest(fs, path)) == end
        assert logged_step(run_dir) == end


def test_a_full_staging_folder_is_one_line_naming_it_and_the_space_needed(tmp_path, monkeypatch):
    import tempfile

    from aevb_dist.config import load_config

    cfg = load_config(SMOKE, [])
    state = {"state": {"step": 4}, "model": {"w": torch.zeros(256, 1024)}}  # 1 MiB of tensors
    calls = []
    with small_disk(tmp_path / "tmp", "512k") as staging:
        monkeypatch.setattr(tempfile, "tempdir", staging)
        with pytest.raises(ValueError) as caught:
            worker.save_checkpoint(cfg, 0, state, {"step": 4}, None, lambda *a: calls.append(a))
    message = str(caught.value)
    assert f"no space left in the local staging folder {staging} (TMPDIR)" in message
    assert "needs about 2.0 MiB" in message and "\n" not in message
    free = float(message.split("MiB free")[0].rsplit(", ", 1)[1])  # the staging disk's, not another's
    assert free <= 0.5  # at most the 512 KiB disk (the wrong disk would have gigabytes)
    assert calls == []  # nothing reached the run folder
    assert not os.listdir(tmp_path / "tmp")  # and nothing was left behind (the mount is gone: its folder is empty)


@pytest.mark.slow  # `aevb-dist prepare` starting up
def test_prepare_onto_a_full_disk_leaves_nothing_and_says_so_in_one_line(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (4000, 784), dtype=np.uint8))
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = aevb("prepare", str(tmp_path / "x.npy"), f"{disk}/data", timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        errors = error_lines(out.stderr)
        assert len(errors) == 1 and f"no space left in {disk}/data" in errors[0], out.stderr
        assert os.listdir(disk) == []  # nothing partial: no staging folder, no half dataset


def test_a_complete_checkpoint_is_kept_when_pruning_the_old_ones_is_refused(tmp_path, monkeypatch):
    """The sink removes a cut-off checkpoint to give its room back, never one written whole: here the
    refusal (EACCES, injected into pruning) comes after the new checkpoint is complete."""
    from aevb_dist.train.run_folder_sink import WriteToRunFolder

    run = storage.Folder.open(str(tmp_path / "run"))
    staging = tmp_path / "staging"
    staging.mkdir()
    checkpoint.save(str(staging), {"state": {"step": 4}, "model": {"w": torch.zeros(3)}}, {"model": {}})

    def refuse(*args):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run" / "checkpoint_old"))

    monkeypatch.setattr(checkpoint, "prune", refuse)
    sink = WriteToRunFolder(run, keep_last=1, retry_s=300)
    name = checkpoint.checkpoint_name(4)
    started = time.monotonic()
    sink(str(staging), name, {"step": 4})
    with pytest.raises(ValueError, match=f"cannot write {name} to {run.uri}: Permission denied"):
        sink.wait()
    assert time.monotonic() - started < 30  # not retried as an outage
    assert checkpoint.verify(run.fs, run.file(name)) is None  # the complete checkpoint stays
