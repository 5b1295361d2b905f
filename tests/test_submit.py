"""`aevb-dist submit` and `aevb-dist jobs` against a real Ray head on 127.0.0.1, with token authentication on."""

import csv
import os
import secrets

import pytest

from aevb_dist.run import checkpoint, storage
from tests import helpers
from tests.helpers import SMOKE, tiny_overrides

pytestmark = pytest.mark.slow  # a real Ray head and its job server


def aevb(head, *args, env=None, timeout=600):
    """The command as a user on the head's machine runs it: the token where `ray start` left it."""
    return helpers.aevb(*args, env={**head.env, **(env or {})}, timeout=timeout)


def test_submitted_training_succeeds_and_resubmission_resumes(ray_head, tiny_data, tmp_path):
    """And a secret in the submitting shell stays there: not in the job's metadata (list_jobs), its logs, the
    cluster's session logs, the run folder or the command's output."""
    from ray.job_submission import JobSubmissionClient

    secret = f"planted-{secrets.token_hex(8)}"
    args = [
        "submit",
        SMOKE,
        *tiny_overrides(tiny_data, str(tmp_path), **{"train.num_workers": 2}),
        "run.name=job",
        "--address",
        ray_head.address,
    ]
    first = aevb(ray_head, *args, "train.max_steps=6", env={"AWS_SECRET_ACCESS_KEY": secret})
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    job_id = first.stdout.splitlines()[0]
    assert job_id.startswith("aevb-job-") and "SUCCEEDED" in first.stderr
    assert "step 6/6" in first.stdout  # the job's own progress, followed
    assert "joining the Ray cluster at $RAY_ADDRESS=" in first.stdout  # said, not silent
    fs, path = storage.resolve(f"{tmp_path}/job")
    assert checkpoint.manifest_step(fs, checkpoint.latest(fs, path)) == 6
    second = aevb(ray_head, *args, "train.max_steps=10")
    assert second.returncode == 0 and "resuming job from checkpoint_0000000006" in second.stdout
    assert checkpoint.manifest_step(fs, checkpoint.latest(fs, path)) == 10
    status = aevb(ray_head, "jobs", "status", job_id, "--address", ray_head.address)
    assert status.returncode == 0 and "SUCCEEDED" in status.stderr
    logs = aevb(ray_head, "jobs", "logs", job_id, "--address", ray_head.address)
    assert "step 6/6" in logs.stdout

    client = JobSubmissionClient(ray_head.address, headers={"Authorization": f"Bearer {head_token(ray_head)}"})
    seen = [first.stdout, first.stderr, logs.stdout, repr(client.list_jobs()), client.get_job_logs(job_id)]
    for folder in (ray_head.temp_dir, str(tmp_path)):
        for root, _, files in os.walk(folder):
            for name in files:
                try:
                    with open(os.path.join(root, name), "rb") as f:
                        seen.append(f.read().decode(errors="replace"))
                except OSError:  # sockets and files that vanish while we look
                    continue
    assert len(seen) > 10 and not [text for text in seen if secret in text]


def head_token(head) -> str:
    return open(os.path.join(head.env["HOME"], ".ray", "auth_token")).read()


def test_bad_config_is_rejected_before_submission(ray_head):
    before = aevb(ray_head, "jobs", "list", "--address", ray_head.address).stdout
    proc = aevb(ray_head, "submit", SMOKE, "train.bogus=1", "--address", ray_head.address)
    assert proc.returncode == 2 and "unknown config key 'train.bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = aevb(ray_head, "submit", SMOKE, "ray.local_mode=true", "--address", ray_head.address)
    assert proc.returncode == 2 and "Submit with ray.local_mode=false" in proc.stderr
    assert aevb(ray_head, "jobs", "list", "--address", ray_head.address).stdout == before


def test_failed_job_reports_failed_and_a_nonzero_exit(ray_head, tiny_data, tmp_path):
    proc = aevb(
        ray_head,
        "submit",
        SMOKE,
        *tiny_overrides(tiny_data, str(tmp_path)),
        f"data.train_uri={tmp_path}/missing",
        "run.name=fails",
        "--address",
        ray_head.address,
    )
    assert proc.returncode == 1
    assert "FAILED" in proc.stderr and "dataset not found" in proc.stdout


def test_unreachable_job_server_is_one_line():
    proc = helpers.aevb("submit", SMOKE, "--address", "http://127.0.0.1:9", timeout=120)
    assert proc.returncode == 2 and "cannot reach the Ray job server" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_or_wrong_token_is_refused_in_one_line_saying_how_to_get_it(ray_head, tmp_path):
    for env, why in (
        ({"RAY_AUTH_TOKEN": "not-the-token"}, "the token it was sent is not the cluster's"),
        ({"HOME": str(tmp_path)}, "no token was found to send"),
    ):
        proc = aevb(ray_head, "jobs", "list", "--address", ray_head.address, env=env, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1 and "refused authentication" in errors[0] and why in errors[0], proc.stderr
        assert "ray get-auth-token" in errors[0]


def test_a_secret_reaches_the_cluster_only_where_pass_env_says_so_with_a_warning(ray_head):
    """Opting in (--pass-env) puts the secret into the job's metadata, and the command says so. That nothing
    reaches it by default: test_submitted_training_succeeds_and_resubmission_resumes."""
    from ray.job_submission import JobSubmissionClient

    secret = f"planted-{secrets.token_hex(8)}"
    forwarded = aevb(
        ray_head,
        "submit",
        SMOKE,
        "--entrypoint=--version",
        "--address",
        ray_head.address,
        "--pass-env",
        "AWS_SECRET_ACCESS_KEY",
        env={"AWS_SECRET_ACCESS_KEY": secret},
    )
    assert forwarded.returncode == 0, forwarded.stderr[-2000:]
    assert "warning: --pass-env puts AWS_SECRET_ACCESS_KEY into the job's metadata" in forwarded.stderr
    client = JobSubmissionClient(ray_head.address, headers={"Authorization": f"Bearer {head_token(ray_head)}"})
    assert secret in repr(client.list_jobs())  # what the warning is about: opting in exposes it


def test_a_sweep_submitted_as_a_job_runs_its_trials_on_the_cluster(ray_head, tiny_data, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: grid(0.01, 0.05)\n")
    proc = aevb(
        ray_head,
        "submit",
        SMOKE,
        *tiny_overrides(tiny_data, str(tmp_path), **{"train.max_steps": 6}),
        "--sweep",
        str(space),
        "--max-concurrent",
        "1",
        "--name",
        "jobsweep",
        "--address",
        ray_head.address,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "SUCCEEDED" in proc.stderr and "sweep jobsweep: 2 trial(s): 2 done" in proc.stdout
    with open(tmp_path / "jobsweep" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["optim.lr"]) for r in rows) == [0.01, 0.05]  # the grid, a trial a value
    assert all(r["state"] == "done" and r["step"] == "6" for r in rows)
    assert os.path.exists(tmp_path / "jobsweep" / "best.yaml")
