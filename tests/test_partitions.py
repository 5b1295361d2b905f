"""`train.global_batch_size`: global batches over a fixed number of partitions, whatever the number of
workers — the same examples, bits and noise, so the same training within floating-point reduction
order; and a run resumed with another worker count continues its epoch exactly once."""

import numpy as np
import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.data.partitions import PartitionedEpoch, partition_shares
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.model.noise import SegmentedNoise, standard_normal
from aevb_dist.run import checkpoint, storage
from aevb_dist.run.metrics import read_metrics
from aevb_dist.train.driver import train
from tests.helpers import SMOKE, final_state, read_all, tiny_overrides

P, M = 8, 24  # 270 training rows in row groups of 16: 18 row groups dealt to 8 partitions


def global_batches(data: ParquetDataset, world_size: int, epoch: int = 1, start: int = 0) -> list[list[int]]:
    """Each global batch's example indices (sorted), gathered over the ranks of `world_size`."""
    per_rank = [
        list(
            PartitionedEpoch(
                data,
                rank=r,
                world_size=world_size,
                num_partitions=P,
                global_batch_size=M,
                epoch=epoch,
                seed=3,
                window=2,
                binarization="dynamic",
                start_batch=start,
            )
        )
        for r in range(world_size)
    ]
    return [sorted(np.concatenate([rank[k][0].index for rank in per_rank]).tolist()) for k in range(len(per_rank[0]))]


def test_the_global_batches_do_not_depend_on_the_number_of_workers(tiny_data):
    data = ParquetDataset(f"{tiny_data}/train")
    reference = global_batches(data, 1)
    assert sorted(i for batch in reference for i in batch) == sorted(read_all(data).index.tolist())  # once each
    assert max(len(b) for b in reference) == M
    for world_size in (2, 3, 5, 8):  # divisors of P or not
        assert global_batches(data, world_size) == reference, world_size


def test_a_resized_resume_continues_the_epoch_exactly_once(tiny_data):
    data = ParquetDataset(f"{tiny_data}/train")
    reference = global_batches(data, 1)
    for before, after, stop in ((2, 3, 4), (4, 1, 7), (1, 8, 1)):
        assert global_batches(data, before)[:stop] + global_batches(data, after, start=stop) == reference


def test_the_same_bits_reach_every_rank_layout(tiny_data):
    data = ParquetDataset(f"{tiny_data}/train")
    rows = {}
    for world_size in (1, 3):
        for rank in range(world_size):
            for batch, _, _ in PartitionedEpoch(
                data,
                rank=rank,
                world_size=world_size,
                num_partitions=P,
                global_batch_size=M,
                epoch=0,
                seed=3,
                binarization="dynamic",
            ):
                for i, x in zip(batch.index, batch.x):
                    assert rows.setdefault((world_size, int(i)), x.tobytes()) == x.tobytes()
    assert all(rows[(1, i)] == rows[(3, i)] for (w, i) in rows if w == 1)


def test_segmented_noise_draws_each_segment_from_its_own_generator():
    like = torch.zeros(())
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    together = standard_normal((2, 7, 3), like, SegmentedNoise(gens(), [3, 4]))
    alone = standard_normal((2, 4, 3), like, SegmentedNoise(gens()[1:], [4]))
    assert torch.equal(together[:, 3:], alone)
    with pytest.raises(ValueError, match="segments"):
        standard_normal((2, 6, 3), like, SegmentedNoise(gens(), [3, 4]))


def test_partition_shares_split_the_global_batch():
    assert partition_shares(24, 8) == [3] * 8 and partition_shares(10, 4) == [3, 3, 2, 2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.num_partitions=4"], "applies to train.global_batch_size"),
        (["train.global_batch_size=4", "data.num_partitions=8"], "smaller than data.num_partitions"),
        (
            ["train.global_batch_size=16", "data.num_partitions=2", "train.num_workers=3"],
            "more than data.num_partitions",
        ),
        (["train.global_batch_size=16", "data.cache_on_device=true"], "does not yet serve"),
    ],
)
def test_bad_partitioning_is_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(SMOKE, overrides)


def run(tiny_data, tmp_path, name: str, workers: int, steps: int) -> dict:
    overrides = tiny_overrides(
        tiny_data,
        str(tmp_path),
        **{
            "train.global_batch_size": M,
            "data.num_partitions": P,
            "train.num_workers": workers,
            "train.max_steps": steps,
            "optim.name": "adam",
            "optim.lr": 0.01,
            "checkpoint.every_steps": 5,
        },
    )
    return train(load_config(SMOKE, overrides + [f"run.name={name}", "ray.local_mode=true"]))


def max_relative_difference(a: dict, b: dict) -> float:
    return max(((a["model"][k] - b["model"][k]).abs().max() / b["model"][k].abs().max()).item() for k in a["model"])


@pytest.mark.slow
def test_one_two_and_four_workers_train_the_same_model(tiny_data, tmp_path):
    """Within fp32 reduction order: max relative parameter difference ≤ 1e-5 after 25 steps (~2 epochs)."""
    for workers in (1, 2, 4):
        run(tiny_data, tmp_path, f"w{workers}", workers, 25)
    states = {w: final_state(f"{tmp_path}/w{w}") for w in (1, 2, 4)}
    fs, root = storage.resolve(str(tmp_path))
    metrics = {w: read_metrics(fs, f"{root}/w{w}/metrics.csv") for w in (1, 2, 4)}
    elbos = {w: [[r["train_elbo"], r["test_elbo"]] for r in rows] for w, rows in metrics.items()}
    assert states[1]["state"]["epoch"] >= 1
    for w in (2, 4):
        assert max_relative_difference(states[w], states[1]) <= 1e-5, w
        assert states[w]["state"]["samples_seen"] == states[1]["state"]["samples_seen"]
        np.testing.assert_allclose(elbos[w], elbos[1], rtol=1e-5)  # train and test ELBO (NaN where not evaluated)


@pytest.mark.slow
def test_a_run_resumed_with_other_worker_counts_equals_the_uninterrupted_one(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "straight", 1, 25)
    run(tiny_data, tmp_path, "resized", 2, 13)  # stops mid-epoch
    run(tiny_data, tmp_path, "resized", 3, 19)  # resumed with 3: mid-epoch again
    last = run(tiny_data, tmp_path, "resized", 1, 25)
    straight, resized = final_state(f"{tmp_path}/straight"), final_state(f"{tmp_path}/resized")
    assert resized["state"]["samples_seen"] == straight["state"]["samples_seen"]  # nothing repeated or skipped
    assert max_relative_difference(resized, straight) <= 1e-5
    assert resized["partitioning"] == {"num_partitions": P, "global_batch_size": M} and last["step"] == 25
    fs, path = storage.resolve(f"{tmp_path}/resized")  # the manifest says so too: the driver plans from it
    assert checkpoint.read_manifest(fs, checkpoint.latest(fs, path))["partitioning"] == resized["partitioning"]
