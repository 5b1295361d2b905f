"""What several test files share: paths, the tiny run's overrides, the command line, the shared data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from aevb_dist.run import checkpoint, storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "smoke.yaml")
# The real MNIST and Frey Face files: `../shared/data` beside the checkout unless AEVB_SHARED_DATA says where.
SHARED_DATA = os.environ.get("AEVB_SHARED_DATA") or os.path.join(os.path.dirname(REPO), "shared", "data")


def shared_data(name: str) -> str:
    """The path of `name` under the shared data folder. Absent, the test is skipped with where to get it,
    or fails where AEVB_REQUIRE_SHARED_DATA=1 (CI, which has the files: it must never silently run less)."""
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(path):
        reason = (
            f"{path} is absent: put MNIST's IDX .gz files (mnist/) and Frey Face (frey_rawface.mat) "
            "in one folder and point AEVB_SHARED_DATA at it"
        )
        if os.environ.get("AEVB_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(data: str, storage_uri: str, **extra) -> list[str]:
    base = {
        "data.train_uri": f"{data}/train",
        "data.test_uri": f"{data}/test",
        "model.input_dim": 16,
        "model.hidden_sizes": "[8]",
        "model.latent_dim": 2,
        "train.batch_size_per_worker": 8,
        "train.log_every_steps": 2,
        "train.eval_every_steps": 4,
        "checkpoint.every_steps": 4,
        "run.storage_uri": storage_uri,
        "optim.name": "adagrad",
        "optim.lr": 0.05,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def aevb(*args: str, env: dict | None = None, unset: tuple = (), **kwargs) -> subprocess.CompletedProcess:
    """`aevb-dist ARGS` in a new process of this interpreter, as a user runs it: never inside a Ray job
    ($RAY_ADDRESS unset), without the variables `unset` names, with `env` added to the environment."""
    gone = {"RAY_ADDRESS", *unset}
    env = {**{k: v for k, v in os.environ.items() if k not in gone}, **(env or {})}
    kwargs.setdefault("timeout", 600)
    return subprocess.run([sys.executable, "-m", "aevb_dist", *args], capture_output=True, text=True, env=env, **kwargs)


def read_all(dataset):
    """Every row of a (small) `ParquetDataset` in file order, as its reader yields them row group by row group."""
    from aevb_dist.data.schema import concat

    return concat([dataset.read(unit) for unit in dataset.units])


def start_train(overrides: list[str], config: str = SMOKE) -> subprocess.Popen:
    """`aevb-dist train CONFIG OVERRIDES` in a session of its own, as in a terminal: a signal to its process
    group reaches the driver and every process it started. Never inside a Ray job ($RAY_ADDRESS unset)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "aevb_dist", "train", config, *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def final_state(run_uri: str, endpoint=None) -> dict:
    fs, path = storage.resolve(run_uri, endpoint)
    latest = checkpoint.latest(fs, path)
    assert latest is not None
    return checkpoint.load(fs, latest)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["state"]["step"] == b["state"]["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, sa in a["optimizer"]["state"].items():
        for k, v in sa.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)
    assert a["state"] == b["state"]


def error_lines(stderr: str) -> list[str]:
    """The command's one-line errors (`aevb-dist CMD: error: ...`) in its stderr."""
    return [line for line in stderr.splitlines() if ": error: " in line]


def byte_dataset(folder, num_rows: int, rows_per_row_group: int, seed: int) -> str:
    """A prepared dataset of `num_rows` random uint8 images of 12 pixels (declared range [0, 255], both ends
    present) in 3 shards of row groups of `rows_per_row_group` rows; its Parquet folder."""
    import numpy as np

    from aevb_dist.data.prepare import prepare

    x = np.random.default_rng(seed).integers(0, 256, (num_rows, 12), dtype=np.uint8)
    x[:, 0], x[:, 1] = 0, 255  # the two ends of the range
    np.save(folder / "x.npy", x)
    pq = str(folder / "pq")
    prepare(str(folder / "x.npy"), pq, num_shards=3, rows_per_row_group=rows_per_row_group, report=lambda m: None)
    return pq
