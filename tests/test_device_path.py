"""The GPU path's parts that run on a CPU too: the device-resident dataset (data.cache_on_device), its
binarization in torch, torch.compile (train.compile) and bf16 autocast (train.autocast). The captured
CUDA-graph step needs a GPU: its test is skipped here, and benchmarks/gpu.py runs it on one."""

import warnings

import numpy as np
import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.data.binarization import _fmix32
from aevb_dist.data.epoch_stream import EpochStream
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.train.device_data import DeviceData, fmix32
from aevb_dist.train.trainer import Trainer
from aevb_dist.train.worker import trainer_for_config
from tests.helpers import SMOKE, byte_dataset, read_all, tiny_overrides


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    """200 uint8 images of 12 pixels (declared range [0, 255]), 3 shards of row groups of 16 rows."""
    return byte_dataset(tmp_path_factory.mktemp("bytes"), 200, rows_per_row_group=16, seed=3)


def test_the_torch_hash_equals_the_readers_numpy_hash():
    words = np.random.default_rng(0).integers(0, 2**32, 10_000, dtype=np.uint64).astype(np.uint32)
    words[:3] = [0, 1, 2**32 - 1]
    expected = _fmix32(words.copy())
    got = fmix32(torch.from_numpy(words.astype(np.int64))).numpy()
    np.testing.assert_array_equal(got, expected.astype(np.int64))


@pytest.mark.parametrize("world_size, shuffle", [(1, True), (3, True), (2, False)])
def test_row_positions_are_the_rows_the_stream_yields(byte_data, world_size, shuffle):
    data = ParquetDataset(f"{byte_data}/train")
    stored_index = read_all(data).index
    for rank in range(world_size):
        stream = EpochStream(
            data, rank=rank, world_size=world_size, batch_size=7, epoch=2, seed=5, shuffle=shuffle, window=2
        )
        streamed = np.concatenate([b.index for b in stream])
        np.testing.assert_array_equal(stored_index[stream.row_positions()], streamed)
        assert stream.global_counts().sum() == data.num_rows


@pytest.mark.parametrize(
    "fixture, mode",
    [
        ("byte_data", "dynamic"),
        ("byte_data", "static"),
        ("byte_data", "none"),
        ("tiny_data", "dynamic"),
        ("tiny_data", "none"),
    ],
)
def test_device_batches_equal_the_streaming_readers_bit_for_bit(request, fixture, mode):
    data = ParquetDataset(f"{request.getfixturevalue(fixture)}/train")
    cache = DeviceData(data, torch.device("cpu"), mode, seed=4)
    assert cache.is_bytes == (fixture == "byte_data" and mode != "none")
    for epoch in (0, 1):
        stream = EpochStream(data, rank=1, world_size=2, batch_size=9, epoch=epoch, seed=4, window=3, binarization=mode)
        plan, words = cache.plan(stream), cache.epoch_words(epoch)
        for b, batch in enumerate(stream):
            positions = plan.positions[b, : int(plan.counts[b])]
            assert int(plan.weights[b].sum()) == len(batch) == int(plan.counts[b])
            np.testing.assert_array_equal(cache.index_N[positions].numpy(), batch.index)
            np.testing.assert_array_equal(cache.batch(positions, words).numpy(), batch.x)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("fixture, mode", [("byte_data", "dynamic"), ("tiny_data", "dynamic"), ("byte_data", "none")])
def test_the_compiled_epoch_binarization_gives_the_eager_bits(request, fixture, mode, device):
    """What the captured step uses on a GPU (FusedInputs: torch.compile of DeviceData.inputs) gives the
    eager rule's bits, for chunks of different lengths (one compiled kernel for dynamic shapes)."""
    from aevb_dist.train.device_data import FusedInputs

    data = ParquetDataset(f"{request.getfixturevalue(fixture)}/train")
    cache = DeviceData(data, torch.device(device), mode, seed=4)
    fused, words = FusedInputs(cache), cache.epoch_words(3)
    order = torch.randperm(data.num_rows, generator=torch.Generator().manual_seed(0)).to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="data.cache_on_device")  # a fallback to eager: vacuous
        for chunk in (order[:64], order[64:101], order[101:]):
            got = fused(chunk, words)
            assert got.dtype == cache.input_dtype
            torch.testing.assert_close(got, cache.inputs(chunk, words), rtol=0, atol=0)
    assert fused.compiled is not None


def _train(data: str, tmp_path, *extra: str) -> Trainer:
    cfg = load_config(SMOKE, tiny_overrides(data, str(tmp_path), **{"train.max_steps": 40}) + list(extra))
    trainer = trainer_for_config(cfg, device="cuda:0" if cfg.train.use_gpu else "cpu")
    trainer.fit(on_log=lambda row: None, on_checkpoint=lambda state, row: None)
    return trainer


def test_training_from_the_device_cache_equals_streaming_bit_for_bit(tiny_data, tmp_path):
    # 270 rows in batches of 8: 34 batches an epoch, the last one short; 40 steps cross into epoch 1.
    streamed = _train(tiny_data, tmp_path / "a", "model.likelihood=bernoulli")
    cached = _train(tiny_data, tmp_path / "b", "model.likelihood=bernoulli", "data.cache_on_device=true")
    assert cached.state == streamed.state and cached.state.epoch == 1
    for a, b in zip(streamed.params, cached.params):
        assert torch.equal(a, b)


def test_bf16_autocast_stays_near_float32_and_keeps_float32_parameters(tiny_data, tmp_path):
    fp32 = _train(tiny_data, tmp_path / "a")
    bf16 = _train(tiny_data, tmp_path / "b", "train.autocast=bfloat16")
    assert all(p.dtype == torch.float32 for p in bf16.params)
    test_fp32, test_bf16 = fp32.evaluate(fp32.test_data), bf16.evaluate(bf16.test_data)
    # bf16 keeps 8 bits of mantissa in the matrix products: 40 steps land within 1% of the bound.
    assert abs(test_bf16 - test_fp32) <= 0.01 * abs(test_fp32), (test_fp32, test_bf16)
    assert any(not torch.equal(a, b) for a, b in zip(fp32.params, bf16.params))  # bf16 did run


@pytest.mark.slow
def test_compiled_step_matches_the_eager_step(tiny_data, tmp_path):
    eager = _train(tiny_data, tmp_path / "a")
    compiled = _train(tiny_data, tmp_path / "b", "train.compile=true")
    assert compiled.state == eager.state
    for a, b in zip(eager.params, compiled.params):  # fused kernels may round differently: fp32 tolerance
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_the_captured_step_refuses_what_it_cannot_replay(tiny_data, tmp_path):
    base = tiny_overrides(tiny_data, str(tmp_path)) + ["train.use_gpu=true", "data.cache_on_device=true"]
    with pytest.raises(ValueError, match="optim.name=adam or sgd"):
        load_config(SMOKE, base + ["optim.name=adagrad"])
    with pytest.raises(ValueError, match="on_nonfinite=skip needs the eager step"):
        load_config(SMOKE, base + ["optim.name=adam", "train.on_nonfinite=skip"])
    load_config(SMOKE, base + ["optim.name=adagrad", "train.cuda_graph=false"])  # the eager step takes both


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.py runs it on one)")
@pytest.mark.parametrize("schedule", ["constant", "burda2015"])  # burda2015: the rate changes at epoch 1
def test_the_captured_cuda_graph_step_equals_the_eager_gpu_step(tiny_data, tmp_path, schedule):
    common = [
        "train.use_gpu=true",
        "data.cache_on_device=true",
        "optim.name=adam",
        "model.likelihood=bernoulli",
        "train.batch_size_per_worker=9",
        f"optim.lr_schedule={schedule}",
    ]  # no short batch: see the test above
    for steps in (1, 40):  # one step: the same noise and data; forty: the same updates throughout
        eager = _train(tiny_data, tmp_path / f"a{steps}", *common, "train.cuda_graph=false", f"train.max_steps={steps}")
        graphed = _train(tiny_data, tmp_path / f"b{steps}", *common, f"train.max_steps={steps}")
        assert graphed.graphed and not eager.graphed and graphed.state == eager.state
        for a, b in zip(eager.params, graphed.params):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "burda2015"])  # burda2015: the rate changes at epoch 1
def test_the_captured_steps_loop_run_uncaptured_equals_the_eager_step(tiny_data, tmp_path, schedule):
    """What the CUDA graph records — static batches, weights, device-side counters and sums, the device
    generator reseeded per step — computes the eager step's update (run here without capture). 270 rows
    in batches of 9: no short batch (a short batch is padded, and its noise is drawn for the padded shape)."""
    from aevb_dist.train.captured_step import CapturedSteps

    extra = (
        "data.cache_on_device=true",
        "optim.name=adam",
        "model.likelihood=bernoulli",
        "train.batch_size_per_worker=9",
        f"optim.lr_schedule={schedule}",
    )
    eager = _train(tiny_data, tmp_path / "a", *extra)
    cfg = load_config(SMOKE, tiny_overrides(tiny_data, str(tmp_path / "b"), **{"train.max_steps": 40}) + list(extra))
    uncaptured, rows = trainer_for_config(cfg), []
    uncaptured.fit(on_log=rows.append, on_checkpoint=lambda state, row: None, steps=CapturedSteps(uncaptured))
    assert uncaptured.state == eager.state and uncaptured.state.epoch == 1  # crossed into the second epoch
    for a, b in zip(eager.params, uncaptured.params):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert [r["step"] for r in rows][:3] == [1, 2, 4] and all(np.isfinite(r["train_elbo"]) for r in rows)
