"""Faults injected for real: a worker killed, the driver killed, a checkpoint cut off, numbers gone bad,
and every bad input answered in one line."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.data.schema import Batch
from aevb_dist.run import checkpoint, storage
from aevb_dist.train.batches import StepBatch
from aevb_dist.train.driver import train
from aevb_dist.train.trainer import NonFiniteError
from aevb_dist.train.worker import trainer_for_config
from tests.faults import (
    SLOW,
    capture_errors,
    check_metrics_contiguous,
    logged_step,
    our_local_workers,
    our_train_workers,
    wait_for,
)
from tests.helpers import SMOKE, aevb, assert_bitwise_equal, final_state, start_train, tiny_overrides


@pytest.mark.slow
@pytest.mark.parametrize("local_mode", [False, True])
def test_a_killed_worker_costs_at_most_one_checkpoint_interval(request, tiny_data, tmp_path, local_mode):
    if not local_mode:
        request.getfixturevalue("ray_local")
    common = tiny_overrides(
        tiny_data,
        str(tmp_path),
        **{**SLOW, "train.num_workers": 2, "train.max_failures": 1, "ray.local_mode": str(local_mode).lower()},
    )
    cfg = load_config(SMOKE, common + ["run.name=killed"])
    errors = []
    runner = threading.Thread(target=lambda: capture_errors(errors, train, cfg))
    runner.start()
    wait_for(lambda: logged_step(f"{tmp_path}/killed") >= 150)  # mid-epoch, past the checkpoint at 100
    victims = our_local_workers() if local_mode else our_train_workers()
    assert len(victims) == 2
    victims[1].send_signal(signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive() and not errors, errors
    state = final_state(f"{tmp_path}/killed")
    assert state["state"]["step"] == 600
    check_metrics_contiguous(f"{tmp_path}/killed", 10, 600)
    # And the recovered run is the uninterrupted run, bit for bit (run in local mode, which starts in seconds: the
    # launchers' runs are equal bit for bit, test_local_mode.py).
    train(load_config(SMOKE, common + ["run.name=straight", "ray.local_mode=true"]))
    assert_bitwise_equal(final_state(f"{tmp_path}/straight"), state)


@pytest.mark.slow
@pytest.mark.parametrize("local_mode", [False, True])
def test_a_killed_driver_resumes_from_the_latest_complete_checkpoint(tiny_data, tmp_path, local_mode):
    args = [
        "train",
        SMOKE,
        *tiny_overrides(tiny_data, str(tmp_path), **{**SLOW, "train.num_workers": 2}),
        "run.name=driver",
        f"ray.local_mode={str(local_mode).lower()}",
    ]  # run.lease_timeout_s: 60 s
    first_err = open(tmp_path / "first.err", "w+")
    driver = subprocess.Popen([sys.executable, "-m", "aevb_dist", *args], stdout=subprocess.DEVNULL, stderr=first_err)
    fs, path = storage.resolve(f"{tmp_path}/driver")
    try:
        try:
            wait_for(
                lambda: (
                    driver.poll() is not None
                    or (checkpoint.latest(fs, path) is not None and logged_step(f"{tmp_path}/driver") > 150)
                ),
                timeout=180,
            )
        finally:
            first_err.seek(0)
            assert driver.poll() is None, first_err.read()[-3000:]
        cluster = [
            p
            for p in psutil.Process(driver.pid).children(recursive=True)
            if local_mode
            or any(
                n in p.name() + " ".join(p.cmdline()[:1])
                for n in ("RayTrainWorker", "TrainController", "raylet", "gcs_server")
            )
        ]
        assert len(cluster) >= 4  # local mode: the fork server, its 2 workers, the resource tracker
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    # Rerun at once: the killed driver's lease is taken over without waiting for it to expire, once its
    # writing worker is gone; the training processes die with their driver, none goes on writing. (The rerun in
    # local mode, which starts in seconds: resuming is the launchers' alike, test_local_mode.py.)
    started = time.monotonic()
    again = aevb(*args, "ray.local_mode=true", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"from pid {driver.pid} on" in again.stderr and "which is no longer running" in again.stderr
    assert "waiting up to" not in again.stderr and time.monotonic() - started < 150
    _, alive = psutil.wait_procs(cluster, timeout=30)
    assert not alive, [p.cmdline()[:1] for p in alive]
    resumed = re.search(r"resuming driver from checkpoint_(\d+) ", again.stderr)
    assert resumed and 100 <= int(resumed.group(1)) < 600, again.stderr[-3000:]
    assert checkpoint.manifest_step(fs, checkpoint.latest(fs, path)) == 600
    check_metrics_contiguous(f"{tmp_path}/driver", 10, 600)


@pytest.mark.slow
def test_a_checkpoint_cut_off_part_way_is_never_resumed_from(tiny_data, tmp_path):
    """What a resume reads is the run folder's (either launcher's workers write it the same way): local mode."""
    common = tiny_overrides(
        tiny_data,
        str(tmp_path),
        **{"ray.local_mode": "true", "train.num_workers": 1, "checkpoint.every_steps": 4, "checkpoint.keep_last": 5},
    )
    train(load_config(SMOKE, common + ["run.name=cut", "train.max_steps=12"]))
    fs, path = storage.resolve(f"{tmp_path}/cut")
    newest = f"{path}/{checkpoint.checkpoint_name(12)}"
    payload = fs.cat_file(f"{newest}/state.pt")
    fs.pipe_file(f"{newest}/state.pt", payload[: len(payload) // 2])  # an upload cut off half way
    os.makedirs(f"{path}/{checkpoint.checkpoint_name(13)}")  # a folder whose manifest never arrived
    with open(f"{path}/{checkpoint.checkpoint_name(13)}/state.pt", "wb") as f:
        f.write(payload)
    warnings = []
    assert checkpoint.latest(fs, path, warn=warnings.append) == f"{path}/{checkpoint.checkpoint_name(8)}"
    assert any("does not match its checksum" in w for w in warnings)
    assert any("no readable manifest.json" in w for w in warnings)
    with pytest.raises(ValueError, match="is not usable"):
        checkpoint.load(fs, newest)
    train(load_config(SMOKE, common + ["run.name=cut", "train.max_steps=16"]))
    train(load_config(SMOKE, common + ["run.name=straight", "train.max_steps=16"]))
    assert_bitwise_equal(final_state(f"{tmp_path}/straight"), final_state(f"{tmp_path}/cut"))


def test_non_finite_step_stops_with_the_step_or_is_skipped_and_counted(tiny_data, tmp_path):
    base = tiny_overrides(tiny_data, str(tmp_path), **{"model.likelihood": "gaussian", "data.binarization": "none"})
    cpu = torch.device("cpu")
    bad = StepBatch.from_host(Batch(np.full((4, 16), 1e30, np.float32), np.arange(4)), cpu)  # (x − μ)² overflows: inf
    good = StepBatch.from_host(Batch(np.random.default_rng(0).random((4, 16)).astype(np.float32), np.arange(4)), cpu)
    trainer = trainer_for_config(load_config(SMOKE, base))
    with pytest.raises(NonFiniteError, match=r"non-finite objective or gradient at step 0 \(epoch 0, batch 0"):
        trainer.step_on(bad)
    trainer = trainer_for_config(load_config(SMOKE, base + ["train.on_nonfinite=skip"]))
    before = [p.detach().clone() for p in trainer.params]
    assert trainer.step_on(bad)[1] == 0 and trainer.state.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))  # nothing applied
    assert trainer.step_on(good)[1] == 4
    assert all(torch.isfinite(p).all() for p in trainer.params)


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if ": error: " in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_diverging_training_fails_with_the_step_and_keeps_no_corrupt_checkpoint(tiny_data, tmp_path):
    # A checkpoint every step: step 1's update is huge but finite, and is saved; a later step goes
    # non-finite, and no checkpoint is written from then on.
    args = [
        "train",
        SMOKE,
        *tiny_overrides(tiny_data, str(tmp_path), **{"train.num_workers": 1, "checkpoint.every_steps": 1}),
        "run.name=diverge",
        "optim.name=sgd",
        "optim.lr=1e30",
        "train.max_steps=8",
    ]
    line = _one_line_error(aevb(*args, timeout=300))
    assert "non-finite" in line and "step" in line
    failed_at = int(re.search(r"(?:at|by) step (\d+)", line).group(1))
    fs, path = storage.resolve(f"{tmp_path}/diverge")
    latest = checkpoint.latest(fs, path)
    assert latest is not None and 1 <= checkpoint.manifest_step(fs, latest) <= failed_at
    assert all(torch.isfinite(v).all() for v in checkpoint.load(fs, latest)["model"].values())


@pytest.mark.slow
def test_bad_inputs_are_answered_in_one_line(tiny_data, tmp_path, s3_endpoint):
    base = ["train", SMOKE, *tiny_overrides(tiny_data, str(tmp_path))]
    cases = [
        (["train.frobnicate=1"], "unknown config key 'train.frobnicate'"),
        (["train.num_workers=lots"], "'train.num_workers' has the wrong type"),
        (["train.batch_size_per_worker=-5"], "must be a positive number"),
        (["model.latent_dim=0"], "must be a positive number"),
        (["run.storage_uri=ftp://host/runs"], "unknown scheme 'ftp://'"),
        (["run.storage_uri=s3://aevb-test/runs", "run.s3_endpoint_url=http://127.0.0.1:9"], "cannot reach"),
        ([f"data.train_uri={tmp_path}"], "no Parquet files found"),
        (["model.input_dim=20"], "width 16 but the model expects model.input_dim=20"),
    ]
    for extra, message in cases:
        assert message in _one_line_error(aevb(*base, *extra, timeout=120)), extra
    no_creds = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    proc = aevb(
        *base,
        "run.storage_uri=s3://aevb-test/runs",
        f"run.s3_endpoint_url={s3_endpoint}",
        env={**no_creds, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"},
        timeout=120,
    )
    assert "credentials" in _one_line_error(proc).lower()
    # A checkpoint of another model shape, found before any worker starts.
    shape = ["run.name=shape", "train.max_steps=4", "ray.local_mode=true"]
    train(load_config(SMOKE, tiny_overrides(tiny_data, str(tmp_path)) + shape))
    line = _one_line_error(aevb(*base, "run.name=shape", "model.hidden_sizes=[12]", "train.max_steps=8", timeout=120))
    assert "holds a checkpoint of a different model" in line and "model.hidden_sizes" in line
    # evaluate: K=0 and a schema mismatch.
    assert "must be at least 1" in _one_line_error(
        aevb("evaluate", f"{tmp_path}/shape", f"{tiny_data}/test", "-k", "0", timeout=120)
    )
    debug = aevb("--debug", "train", SMOKE, "train.frobnicate=1", timeout=60)
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug shows the traceback


@pytest.mark.slow
def test_credentials_never_reach_the_run_folder(tiny_data, tmp_path):
    """In local mode, which starts in seconds: the run folder is written alike under both launchers (a real Ray
    head's session folder and a job's run folder: test_submit.py)."""
    secret = "PLANTED-SECRET-6f1c2d"
    proc = aevb(
        "train",
        SMOKE,
        *tiny_overrides(tiny_data, str(tmp_path), **{"train.num_workers": 1, "ray.local_mode": "true"}),
        "run.name=secret",
        "train.max_steps=6",
        env={"AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": secret},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert secret not in proc.stdout + proc.stderr
    for root, _, files in os.walk(tmp_path / "secret"):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert secret.encode() not in f.read(), name


@pytest.mark.slow
def test_a_worker_lost_mid_run_without_restarts_is_one_line_naming_the_checkpoint(tiny_data, tmp_path):
    """train.max_failures=0 (the default): a training worker killed mid-run ends the command with exit
    status 2 and one line naming the checkpoint to resume from, whichever rank's error Ray Train reports
    first (the lost actor's, or the surviving rank's gloo error as its peer's connection resets)."""
    overrides = tiny_overrides(tiny_data, str(tmp_path), **{**SLOW, "train.num_workers": 2}) + ["run.name=lost"]
    proc = start_train(overrides)
    try:
        wait_for(lambda: proc.poll() is not None or logged_step(f"{tmp_path}/lost") >= 150, timeout=240)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        workers = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline()[:1])
        ]
        assert len(workers) == 2
        workers[1].send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2, err[-3000:]
    assert last.startswith("aevb-dist train: error: Ray failed during the run (lost ") and "Traceback" not in err, err
    fs, path = storage.resolve(f"{tmp_path}/lost")
    newest = checkpoint.latest(fs, path)
    assert checkpoint.manifest_step(fs, newest) >= 100
    name = newest.rsplit("/", 1)[-1]
    assert f"{tmp_path}/lost keeps its newest complete checkpoint, {name}: run the same command again to resume" in last
