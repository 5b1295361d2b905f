"""`aevb-dist train` as a user runs it: its own embedded Ray, progress, resume, clear errors."""

import pytest

from aevb_dist.run import checkpoint, storage
from tests.helpers import SMOKE, aevb, tiny_overrides

pytestmark = pytest.mark.slow  # `aevb-dist train` processes, each starting an embedded Ray


def test_train_command_runs_then_resumes_with_more_steps(tiny_data, tmp_path):
    args = ["train", SMOKE, *tiny_overrides(tiny_data, str(tmp_path), **{"train.num_workers": 2}), "run.name=t"]
    first = aevb(*args, "train.max_steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 6/6" in first.stderr and "samples/s" in first.stderr and "train ELBO" in first.stderr
    second = aevb(*args, "train.max_steps=10", "ray.local_mode=true")  # the resume is the launchers' alike
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming t from checkpoint_0000000006 (step 6 of 10)" in second.stderr
    assert "step 2/10" not in second.stderr and "step 10/10" in second.stderr
    fs, path = storage.resolve(f"{tmp_path}/t")
    assert checkpoint.manifest_step(fs, checkpoint.latest(fs, path)) == 10
    again = aevb(*args, "train.max_steps=10", "ray.local_mode=true")
    assert again.returncode == 0 and "nothing to train" in again.stderr


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if "aevb-dist train: error:" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_train_bad_inputs_fail_fast_with_one_line(tiny_data, tmp_path):
    base = tiny_overrides(tiny_data, str(tmp_path))
    assert "no Parquet files found" in _one_line_error(aevb("train", SMOKE, *base, f"data.train_uri={tmp_path}"))
    assert "model.input_dim=784" in _one_line_error(aevb("train", SMOKE, *base, "model.input_dim=784"))
    assert "dataset not found" in _one_line_error(aevb("train", SMOKE, *base, f"data.test_uri={tmp_path}/nope"))
    root = tiny_data.rstrip("/")
    for key in ("data.train_uri", "data.test_uri"):
        assert f"{key}: {root} holds the splits train/ and test/ of a prepared dataset, not one split: pass" in (
            _one_line_error(aevb("train", SMOKE, *base, f"{key}={root}"))
        )
    assert "unknown scheme 'hdfs://'" in _one_line_error(aevb("train", SMOKE, *base, "run.storage_uri=hdfs://x/y"))
    assert "is private to one process" in _one_line_error(aevb("train", SMOKE, *base, "run.storage_uri=memory://x"))
