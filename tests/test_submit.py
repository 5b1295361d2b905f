"""`aevb-dist submit` and `aevb-dist jobs` against a real Ray head on 127.0.0.1."""

import os

import pytest

from aevb_dist import checkpoint, storage
from tests import helpers
from tests.helpers import SMOKE, tiny_overrides

pytestmark = pytest.mark.slow  # a real Ray head and its job server


def aevb(*args, timeout=600):
    return helpers.aevb(*args, env={"RAY_AUTH_MODE": "disabled"}, timeout=timeout)


def test_submitted_training_succeeds_and_resubmission_resumes(ray_head, tiny_data, tmp_path):
    args = ["submit", SMOKE, *tiny_overrides(tiny_data, str(tmp_path), **{"train.num_workers": 2}),
            "run.name=job", "--address", ray_head]
    first = aevb(*args, "train.max_steps=6")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    job_id = first.stdout.splitlines()[0]
    assert job_id.startswith("aevb-job-") and "SUCCEEDED" in first.stderr
    assert "step 6/6" in first.stdout  # the job's own progress, followed
    assert "joining the Ray cluster at $RAY_ADDRESS=" in first.stdout  # said, not silent
    fs, path = storage.resolve(f"{tmp_path}/job")
    assert checkpoint.manifest_step(fs, checkpoint.latest(fs, path)) == 6
    second = aevb(*args, "train.max_steps=10")
    assert second.returncode == 0 and "resuming job from checkpoint_0000000006" in second.stdout
    assert checkpoint.manifest_step(fs, checkpoint.latest(fs, path)) == 10
    status = aevb("jobs", "status", job_id, "--address", ray_head)
    assert status.returncode == 0 and "SUCCEEDED" in status.stderr
    logs = aevb("jobs", "logs", job_id, "--address", ray_head)
    assert "step 6/6" in logs.stdout
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in first.stdout + first.stderr + logs.stdout


def test_bad_config_is_rejected_before_submission(ray_head):
    before = aevb("jobs", "list", "--address", ray_head).stdout
    proc = aevb("submit", SMOKE, "train.bogus=1", "--address", ray_head)
    assert proc.returncode == 2 and "unknown config key 'train.bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = aevb("submit", SMOKE, "ray.local_mode=true", "--address", ray_head)
    assert proc.returncode == 2 and "Submit with ray.local_mode=false" in proc.stderr
    assert aevb("jobs", "list", "--address", ray_head).stdout == before


def test_failed_job_reports_failed_and_a_nonzero_exit(ray_head, tiny_data, tmp_path):
    proc = aevb("submit", SMOKE, *tiny_overrides(tiny_data, str(tmp_path)), f"data.train_uri={tmp_path}/missing",
                "run.name=fails", "--address", ray_head)
    assert proc.returncode == 1
    assert "FAILED" in proc.stderr and "dataset not found" in proc.stdout


def test_unreachable_job_server_is_one_line():
    proc = aevb("submit", SMOKE, "--address", "http://127.0.0.1:9", timeout=120)
    assert proc.returncode == 2 and "cannot reach the Ray job server" in proc.stderr
    assert "Traceback" not in proc.stderr
