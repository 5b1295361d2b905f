"""Training with real gloo workers: resume bit for bit, the ELBO improving, the model's math, and the S3 round trip
with two workers. In local mode, which starts in seconds: what they test does not depend on the launcher (both
launchers' runs are equal bit for bit: tests/test_local_mode.py; the embedded Ray's workers on S3:
tests/test_storage_outage.py)."""

import os
import tempfile

import pytest

from aevb_dist.config import load_config
from aevb_dist.run import checkpoint, storage
from aevb_dist.run.metrics import read_metrics
from aevb_dist.train.driver import train
from tests.helpers import SMOKE, assert_bitwise_equal, final_state, tiny_overrides

pytestmark = pytest.mark.slow  # training runs in worker processes


def test_stopped_and_resumed_run_equals_uninterrupted_run_bit_for_bit(tiny_data, tmp_path):
    """One worker on local disk; two workers through S3 below."""
    common = tiny_overrides(
        tiny_data,
        str(tmp_path),
        **{"ray.local_mode": "true", "train.num_workers": 1, "train.batch_size_per_worker": 16},
    )
    train(load_config(SMOKE, common + ["run.name=straight", "train.max_steps=30"]))
    train(load_config(SMOKE, common + ["run.name=resumed", "train.max_steps=13"]))  # stops mid-epoch
    last = train(load_config(SMOKE, common + ["run.name=resumed", "train.max_steps=30"]))
    straight, resumed = final_state(f"{tmp_path}/straight"), final_state(f"{tmp_path}/resumed")
    assert resumed["state"]["epoch"] >= 1  # the run crossed an epoch boundary after resuming
    assert_bitwise_equal(straight, resumed)
    fs, path = storage.resolve(f"{tmp_path}/resumed")
    steps = [row["step"] for row in read_metrics(fs, f"{path}/metrics.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == 30 and 13 in steps
    assert last["step"] == 30 and last["test_elbo"] == last["test_elbo"]  # not NaN
    assert fs.exists(f"{path}/config.yaml") and fs.ls(f"{path}/tensorboard")


def test_training_improves_the_elbo_and_keeps_last_checkpoints(tiny_data, tmp_path):
    cfg = load_config(
        SMOKE,
        tiny_overrides(
            tiny_data,
            str(tmp_path),
            **{
                "ray.local_mode": "true",
                "train.num_workers": 2,
                "train.num_epochs": 6,
                "train.max_steps": "null",
                "checkpoint.keep_last": 2,
            },
        ),
    )
    train(cfg)
    fs, path = storage.resolve(f"{tmp_path}/smoke")
    rows = read_metrics(fs, f"{path}/metrics.csv")
    assert rows[-1]["epoch"] == 5  # epochs count from 0
    assert rows[-1]["samples_seen"] == 6 * 270  # every example once per epoch, nothing dropped
    tests = [r["test_elbo"] for r in rows if r["test_elbo"] == r["test_elbo"]]
    assert tests[-1] > tests[0] + 0.3
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path) if "checkpoint_0" in p]
    assert len(names) == 2


def test_s3_round_trip_with_two_workers(tiny_data, tmp_path, s3_endpoint, monkeypatch):
    from aevb_dist.data.prepare import prepare

    scratch = tmp_path / "scratch"  # the runs' temporary folders (TensorBoard's, a checkpoint's on its way)
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    data = "s3://aevb-test/datasets/tiny"
    prepare(
        f"{tiny_data}/../x.npy",
        data,
        num_shards=3,
        rows_per_row_group=16,
        endpoint_url=s3_endpoint,
        report=lambda m: None,
    )
    two_workers = {"ray.local_mode": "true", "train.num_workers": 2, "train.batch_size_per_worker": 16}
    common = tiny_overrides(data, "s3://aevb-test/runs", **two_workers, **{"run.s3_endpoint_url": s3_endpoint})
    train(load_config(SMOKE, common + ["run.name=s3run", "train.max_steps=13"]))  # stops mid-epoch
    train(load_config(SMOKE, common + ["run.name=s3run", "train.max_steps=30"]))
    fs, path = storage.resolve("s3://aevb-test/runs/s3run", s3_endpoint)
    assert checkpoint.manifest_step(fs, checkpoint.latest(fs, path)) == 30
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if "checkpoint_0" in p)
    assert names == [checkpoint.checkpoint_name(28), checkpoint.checkpoint_name(30)]  # keep_last=2, pruned on S3
    steps = [row["step"] for row in read_metrics(fs, f"{path}/metrics.csv")]
    assert steps == [1, *range(2, 13, 2), 13, *range(14, 31, 2)]  # every row uploaded, none twice, none lost
    assert fs.ls(f"{path}/tensorboard") and not [p.name for p in scratch.iterdir() if p.name.startswith("aevb-")]
    # An uninterrupted run on local disk reaches the same parameters and optimizer state bit for bit: neither the
    # resume nor the storage changes the math.
    local = tiny_overrides(f"{tmp_path}/local_data", str(tmp_path), **two_workers)
    prepare(
        f"{tiny_data}/../x.npy", f"{tmp_path}/local_data", num_shards=3, rows_per_row_group=16, report=lambda m: None
    )
    train(load_config(SMOKE, local + ["run.name=local", "train.max_steps=30"]))
    resumed = final_state("s3://aevb-test/runs/s3run", s3_endpoint)
    assert resumed["state"]["epoch"] >= 1  # the run crossed an epoch boundary after resuming
    assert_bitwise_equal(final_state(f"{tmp_path}/local"), resumed)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in fs.cat_file(f"{path}/config.yaml").decode()


def test_a_laplace_posterior_and_continuous_bernoulli_likelihood_train_from_config(tiny_data, tmp_path):
    """The model's math, not the launcher's: local mode, which starts in seconds."""
    cfg = load_config(
        SMOKE,
        tiny_overrides(
            tiny_data,
            str(tmp_path),
            **{
                "ray.local_mode": "true",
                "train.num_workers": 2,
                "train.num_epochs": 6,
                "train.max_steps": "null",
                "model.posterior": "laplace",
                "model.likelihood": "continuous_bernoulli",
                "data.binarization": "dynamic",
            },
        ),
    )
    train(cfg)
    fs, path = storage.resolve(f"{tmp_path}/smoke")
    tests = [r["test_elbo"] for r in read_metrics(fs, f"{path}/metrics.csv") if r["test_elbo"] == r["test_elbo"]]
    assert tests[-1] > tests[0] + 0.3
    # A density on [0, 1] of unbinarized grey pixels: well above the Bernoulli bound's 16·log 2 ceiling of −0.
    assert tests[-1] > 0
    saved = final_state(f"{tmp_path}/smoke")
    assert saved["config"]["model"]["posterior"] == "laplace"
