"""The driver's plan of a run (train/driver.py `plan_run`): decided before any worker starts, without I/O."""

import pytest

from aevb_dist.config import load_config, to_dict
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.train.driver import plan_run
from tests.helpers import SMOKE, tiny_overrides


def _cfg(tiny_data, tmp_path, *extra):
    return load_config(SMOKE, tiny_overrides(tiny_data, str(tmp_path), **{"train.max_steps": 40}) + list(extra))


def test_a_new_run_starts_at_step_zero_and_reads_the_data_mean_only_when_asked(tiny_data, tmp_path):
    data = ParquetDataset(f"{tiny_data}/train")
    plan = plan_run(_cfg(tiny_data, tmp_path), data, "runs/x", None, None)
    assert (plan.total_steps, plan.start_step, plan.resumes_from, plan.done) == (40, 0, None, False)
    assert not plan.computes_data_mean and plan.announcement("x", "runs/x") is None
    asked = plan_run(_cfg(tiny_data, tmp_path, "model.output_bias_init=data_mean"), data, "runs/x", None, None)
    assert asked.computes_data_mean
    one_epoch = plan_run(
        _cfg(tiny_data, tmp_path, "train.max_steps=null", "train.num_epochs=1"), data, "runs/x", None, None
    )
    assert one_epoch.total_steps == -(-270 // 8)  # 270 rows in batches of 8: 34 steps


def test_a_resumed_run_starts_at_its_checkpoint_and_a_finished_one_has_nothing_to_do(tiny_data, tmp_path):
    cfg, data = _cfg(tiny_data, tmp_path, "model.output_bias_init=data_mean"), ParquetDataset(f"{tiny_data}/train")
    manifest = {"step": 24, "model": to_dict(cfg)["model"]}
    plan = plan_run(cfg, data, "runs/x", "runs/x/checkpoint_000024", manifest)
    assert (plan.start_step, plan.resumes_from, plan.done, plan.computes_data_mean) == (
        24,
        "checkpoint_000024",
        False,
        False,  # the checkpoint's parameters stand
    )
    assert plan.announcement("x", "runs/x") == "resuming x from checkpoint_000024 (step 24 of 40)"
    finished = plan_run(cfg, data, "runs/x", "runs/x/checkpoint_000040", {**manifest, "step": 40})
    assert finished.done and "nothing to train" in finished.announcement("x", "runs/x")


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tiny_data, tmp_path):
    cfg, data = _cfg(tiny_data, tmp_path), ParquetDataset(f"{tiny_data}/train")
    saved = {**to_dict(cfg)["model"], "latent_dim": 7}
    with pytest.raises(ValueError, match="runs/x holds a checkpoint of a different model .*model.latent_dim: 7"):
        plan_run(cfg, data, "runs/x", "runs/x/checkpoint_000008", {"step": 8, "model": saved})
    changed_init = {**to_dict(cfg)["model"], "init": "glorot_uniform", "output_bias_init": "data_mean"}
    plan_run(cfg, data, "runs/x", "runs/x/checkpoint_000008", {"step": 8, "model": changed_init})  # first step only


def test_a_checkpoint_fits_a_config_whose_shape_differs_only_in_its_one_channel_or_was_left_unset():
    from aevb_dist.run.checkpoint import check_fits

    now = {"latent_dim": 2, "input_shape": [28, 28], "init_std": 0.01}
    for saved_shape in ([1, 28, 28], [28, 28], None):
        check_fits(now, {**now, "input_shape": saved_shape, "init_std": 0.1}, "runs/x", "checkpoint_000008")
    check_fits(now, None, "runs/x", "checkpoint_000008")  # an older manifest, without model.*
    with pytest.raises(ValueError, match=r"model.input_shape: \[3, 28, 28\] in checkpoint_000008, \[28, 28\] now"):
        check_fits(now, {**now, "input_shape": [3, 28, 28]}, "runs/x", "checkpoint_000008")


def test_a_resumed_global_batch_run_counts_its_steps_over_the_partitions_its_checkpoint_recorded(tiny_data, tmp_path):
    from aevb_dist.train.batches import BatchSource

    cfg = _cfg(tiny_data, tmp_path, "train.global_batch_size=16", "train.max_steps=null", "train.num_epochs=1")
    data = ParquetDataset(f"{tiny_data}/train")
    steps_over = {
        p: BatchSource(
            data,
            train_cfg=cfg.train,
            data_cfg=cfg.data,
            seed=cfg.seed,
            rank=0,
            world_size=1,
            binarization="none",
            device=None,
            num_partitions=p,
        ).total_steps()
        for p in (None, 2)  # None: the default partitions of a new run
    }
    assert steps_over[2] != steps_over[None]  # the tiny data's epoch is cut differently over 2 partitions
    assert plan_run(cfg, data, "runs/x", None, None).total_steps == steps_over[None]
    manifest = {
        "step": 4,
        "model": to_dict(cfg)["model"],
        "partitioning": {"num_partitions": 2, "global_batch_size": 16},
    }
    resumed = plan_run(cfg, data, "runs/x", "runs/x/checkpoint_000004", manifest)
    assert (resumed.total_steps, resumed.start_step) == (steps_over[2], 4)
    older = {k: v for k, v in manifest.items() if k != "partitioning"}  # a manifest that does not say
    assert plan_run(cfg, data, "runs/x", "runs/x/checkpoint_000004", older).total_steps == steps_over[None]
    other_batch = {**manifest, "partitioning": {"num_partitions": 2, "global_batch_size": 32}}
    with pytest.raises(ValueError, match="train.global_batch_size=16 differs from the run's 32"):
        plan_run(cfg, data, "runs/x", "runs/x/checkpoint_000004", other_batch)
    without = {**manifest, "partitioning": None}
    with pytest.raises(ValueError, match="this run was started without train.global_batch_size"):
        plan_run(cfg, data, "runs/x", "runs/x/checkpoint_000004", without)
