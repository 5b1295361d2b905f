"""The product's commands on a GPU: `aevb-dist train train.use_gpu=true` under Ray Train (NCCL, one worker; two
workers sharing the GPU over gloo) and in local mode, and streamed data against the device cache. Skipped where
no GPU is visible (benchmarks/device_suite.py runs them on a GPU machine)."""

import glob
import os

import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.train.trainer import Trainer
from aevb_dist.train.worker import trainer_for_config
from tests.helpers import SMOKE, aevb, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device_suite.py runs it)")


def _gpu_run(tiny_data, tmp_path, name: str, *extra: str):
    overrides = tiny_overrides(
        tiny_data,
        str(tmp_path / "runs"),
        **{"train.use_gpu": "true", "optim.name": "sgd", "optim.lr": 0.05, "train.max_steps": 24},
    )
    proc = aevb("train", SMOKE, *overrides, f"run.name={name}", *extra, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done:" in proc.stderr
    return proc


def _final_parameters(run: str) -> dict:
    from aevb_dist.run import checkpoint, storage

    fs, path = storage.resolve(run)
    return checkpoint.load(fs, checkpoint.latest(fs, path))["model"]


@pytest.mark.slow
def test_one_gpu_worker_under_ray_train_all_reduces_over_nccl_and_local_mode_trains_too(tiny_data, tmp_path):
    proc = _gpu_run(tiny_data, tmp_path, "nccl", "train.num_workers=1")
    assert "1 worker(s) × " in proc.stderr and " CPU and 1 GPU" in proc.stderr
    _gpu_run(tiny_data, tmp_path, "local", "train.num_workers=1", "ray.local_mode=true")
    on_ray = _final_parameters(str(tmp_path / "runs" / "nccl"))
    local = _final_parameters(str(tmp_path / "runs" / "local"))
    for key in on_ray:  # the same run under either launcher
        torch.testing.assert_close(on_ray[key], local[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_workers_sharing_the_gpu_end_where_one_worker_does(tiny_data, tmp_path):
    """NCCL refuses two ranks on one device ("Duplicate GPU detected"): shared GPUs all-reduce over gloo, which
    takes CUDA tensors. A global batch of 16 in both runs; SGD (Adam would turn rounding into ±lr steps)."""
    _gpu_run(tiny_data, tmp_path, "one", "train.num_workers=1", "train.global_batch_size=16")
    _gpu_run(
        tiny_data,
        tmp_path,
        "two",
        "train.num_workers=2",
        "train.global_batch_size=16",
        "train.gpus_per_worker=0.5",
        "train.cpus_per_worker=1",
    )
    one, two = _final_parameters(str(tmp_path / "runs" / "one")), _final_parameters(str(tmp_path / "runs" / "two"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    assert glob.glob(os.path.join(tmp_path, "runs", "two", "checkpoint_*"))


def _fit(tiny_data, tmp_path, *extra: str) -> Trainer:
    overrides = tiny_overrides(tiny_data, str(tmp_path), **{"train.max_steps": 40})
    cfg = load_config(SMOKE, overrides + ["train.use_gpu=true", "model.likelihood=bernoulli", *extra])
    trainer = trainer_for_config(cfg, device="cuda:0")
    trainer.fit(on_log=lambda row: None, on_checkpoint=lambda state, row: None)
    return trainer


@pytest.mark.parametrize("graph", ["true", "false"])
def test_streamed_data_trains_as_the_device_cache_does_bit_for_bit(tiny_data, tmp_path, graph):
    """The captured step (adam) and the eager step, each fed from streamed windows and from the device cache."""
    common = ("optim.name=adam", "train.batch_size_per_worker=8", f"train.cuda_graph={graph}")
    streamed = _fit(tiny_data, tmp_path / "a", *common)
    cached = _fit(tiny_data, tmp_path / "b", *common, "data.cache_on_device=true")
    assert streamed.device_windows is not None and cached.device_windows is None
    assert streamed.graphed == cached.graphed == (graph == "true")
    assert streamed.state == cached.state and cached.state.epoch == 1
    for a, b in zip(cached.params, streamed.params):
        assert torch.equal(a, b)
