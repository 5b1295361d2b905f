"""Streamed data on the device (train/device_stream.py), run on a CPU: the same code without pinned memory or a
side stream. Its batches are the streaming reader's (examples, order, bits), from any data position, and
training from it equals training from the host reader and from the device cache, bit for bit."""

import numpy as np
import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.config.checks import captured_step_cannot_serve
from aevb_dist.data.epoch_stream import EpochStream
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.train.captured_step import CapturedSteps
from aevb_dist.train.device_stream import DeviceWindows, default_decode_threads
from aevb_dist.train.trainer import Trainer
from aevb_dist.train.worker import trainer_for_config
from tests.helpers import SMOKE, byte_dataset, tiny_overrides


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    """300 uint8 images of 12 pixels in row groups of 13 rows (windows never end on a batch's edge)."""
    return byte_dataset(tmp_path_factory.mktemp("bytes"), 300, rows_per_row_group=13, seed=5)


@pytest.mark.parametrize(
    "fixture, mode, shuffle, world_size",
    [
        ("byte_data", "dynamic", True, 1),
        ("byte_data", "static", True, 2),
        ("byte_data", "none", False, 2),
        ("tiny_data", "dynamic", True, 3),
        ("tiny_data", "none", True, 1),
    ],
)
def test_streamed_windows_yield_the_streaming_readers_batches_bit_for_bit(request, fixture, mode, shuffle, world_size):
    data = ParquetDataset(f"{request.getfixturevalue(fixture)}/train")
    windows = DeviceWindows(data, torch.device("cpu"), mode, seed=4, decode_threads=3)
    for epoch, start_batch in ((0, 0), (1, 5), (2, 8)):  # from the start, and resumed mid-window
        for rank in range(world_size):
            common = dict(rank=rank, world_size=world_size, batch_size=9, epoch=epoch, seed=4, window=3)
            stream = EpochStream(data, shuffle=shuffle, binarization=mode, start_batch=start_batch, **common)
            host = list(stream)
            device = list(windows.batches(stream))
            assert len(device) == len(host) == stream.num_batches - start_batch
            for (x_BD, index_B), batch in zip(device, host):
                assert x_BD.dtype == torch.float32
                np.testing.assert_array_equal(index_B, batch.index)
                np.testing.assert_array_equal(x_BD.numpy(), batch.x)
            assert any(len(b) for b in host)  # the comparison is not vacuous


def _trainer(data: str, tmp_path, *extra: str) -> Trainer:
    overrides = tiny_overrides(data, str(tmp_path), **{"train.max_steps": 40}) + ["model.likelihood=bernoulli"]
    return trainer_for_config(load_config(SMOKE, overrides + list(extra)))


def _streamed(trainer: Trainer) -> Trainer:
    """The trainer reading through the device windows (on a GPU the default without the device cache)."""
    windows = DeviceWindows(trainer.source.data, trainer.device, trainer.source.binarization, trainer.seed, 2)
    trainer.source.device_windows = windows
    return trainer


def _fit(trainer: Trainer, steps=None) -> Trainer:
    trainer.fit(on_log=lambda row: None, on_checkpoint=lambda state, row: None, steps=steps)
    return trainer


def test_training_on_streamed_windows_equals_the_host_reader_bit_for_bit(tiny_data, tmp_path):
    host = _fit(_trainer(tiny_data, tmp_path / "a"))
    streamed = _fit(_streamed(_trainer(tiny_data, tmp_path / "b")))
    assert streamed.state == host.state and host.state.epoch == 1  # crossed into the second epoch
    for a, b in zip(host.params, streamed.params):
        assert torch.equal(a, b)


def test_the_captured_step_on_streamed_windows_equals_it_on_the_device_cache(tiny_data, tmp_path):
    """What the CUDA graph records, fed one streamed batch at a time (run here without capture), gives the
    cached epoch's updates: the same padded shapes, the same noise. 270 rows in batches of 8: a short last batch."""
    extra = ("optim.name=adam", "train.batch_size_per_worker=8")
    cached = _trainer(tiny_data, tmp_path / "a", "data.cache_on_device=true", *extra)
    _fit(cached, CapturedSteps(cached))
    streamed = _streamed(_trainer(tiny_data, tmp_path / "b", *extra))
    runner = CapturedSteps(streamed)
    assert runner.streamed
    _fit(streamed, runner)
    assert streamed.state == cached.state and cached.state.epoch == 1
    for a, b in zip(cached.params, streamed.params):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim.name=adam"],
        ["optim.name=adagrad"],
        ["optim.name=adam_burda2015"],
        ["optim.name=sgd", "optim.lr_schedule=burda2015"],
        ["optim.name=adam", "optim.lr_schedule=burda2015"],
        ["optim.name=adam", "train.on_nonfinite=skip"],
        ["optim.name=adam", "train.kl_warmup_steps=5"],
        ["optim.name=adam", "train.global_batch_size=20"],
    ],
)
def test_the_graph_serves_where_the_config_check_lets_it_and_a_streamed_run_falls_back_saying_why(
    tiny_data, tmp_path, overrides, capsys
):
    """One rule (config.checks.captured_step_cannot_serve) answers both callers: what the config check refuses
    for a device-cache run is exactly what a streamed run takes the eager step for (but for the partitioned
    epochs of train.global_batch_size, which only streaming reads on the host)."""
    base = tiny_overrides(tiny_data, str(tmp_path)) + ["train.use_gpu=true", "train.cuda_graph=true"]
    cfg = load_config(SMOKE, base + overrides)  # streamed: never refused
    streamed_why = captured_step_cannot_serve(cfg.train, cfg.optim, streamed=True)
    try:
        load_config(SMOKE, base + overrides + ["data.cache_on_device=true"])
        refused = None
    except ValueError as err:
        refused = str(err)
    cached_why = captured_step_cannot_serve(cfg.train, cfg.optim, streamed=False)
    if refused is not None and "does not yet serve train.global_batch_size" in refused:
        assert cached_why is None  # the device cache refuses global batches itself, graph or not
        refused = None
    assert (refused is None) == (cached_why is None)
    if refused is not None:
        assert (
            refused == f"train.cuda_graph=true cannot capture this run's step: {cached_why}; set train.cuda_graph=false"
        )
        assert streamed_why == cached_why
    assert (streamed_why is None) == (
        overrides in (["optim.name=adam"], ["optim.name=adam", "optim.lr_schedule=burda2015"])
    )
    # The trainer of a streamed GPU run asks the same rule, and says why it falls back (rank 0).
    capsys.readouterr()
    assert trainer_for_config(cfg)._graph_serves() == (streamed_why is None)
    said = capsys.readouterr().err
    assert (f"train.cuda_graph: the eager step runs: {streamed_why}" in said) == (streamed_why is not None), said


def test_decode_threads_default_to_a_windows_row_groups_within_the_cores():
    assert default_decode_threads(1) == 1
    assert 1 <= default_decode_threads(64) <= 64
