"""optim.lr_schedule and optim.eps: the learning rate by epoch (Burda et al. 2015's stages), set in the
Trainer as each epoch starts, kept through a resume, and refused where the captured step could not follow it."""

import copy

import pytest
import torch

from aevb_dist import names
from aevb_dist.config import load_config
from aevb_dist.train.optimizers import build_optimizer, learning_rate
from aevb_dist.train.worker import trainer_for_config
from tests.helpers import SMOKE, tiny_overrides


def test_burda2015_is_the_papers_stages_and_then_its_last_rate():
    # Burda et al. (2015), §5: "3^i epochs with learning rate 0.001·10^(−i/7), for i = 0…7".
    expected = [0.001 * 10 ** (-i / 7) for i in range(8) for _ in range(3**i)]
    assert len(expected) == 3280
    got = [learning_rate(0.001, "burda2015", epoch) for epoch in range(3280)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert (
        learning_rate(0.001, "burda2015", 3280)
        == learning_rate(0.001, "burda2015", 10**6)
        == pytest.approx(1e-4, rel=1e-12)
    )
    assert {learning_rate(0.02, "constant", epoch) for epoch in (0, 1, 5000)} == {0.02}


@pytest.mark.parametrize("schedule", names.LR_SCHEDULES)
def test_every_schedule_is_accepted_and_starts_at_optim_lr(schedule):
    cfg = load_config(SMOKE, [f"optim.lr_schedule={schedule}"])
    assert learning_rate(cfg.optim.lr, schedule, 0) == cfg.optim.lr


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr_schedule=cosine", "optim.lr_schedule='cosine' is not allowed"),
        ("optim.eps=0", "optim.eps=0.0 must be a positive number"),
    ],
)
def test_a_bad_schedule_or_eps_is_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(SMOKE, [override])
    with pytest.raises(ValueError, match="SGD has no ε"):
        load_config(SMOKE, ["optim.name=sgd", "optim.eps=1e-4"])


def test_the_captured_step_takes_a_schedule_only_with_adam(tiny_data, tmp_path):
    base = tiny_overrides(tiny_data, str(tmp_path)) + [
        "train.use_gpu=true",
        "data.cache_on_device=true",
        "optim.lr_schedule=burda2015",
    ]
    with pytest.raises(ValueError, match="needs optim.name=adam"):
        load_config(SMOKE, base + ["optim.name=sgd"])
    load_config(SMOKE, base + ["optim.name=adam"])
    load_config(SMOKE, base + ["optim.name=sgd", "train.cuda_graph=false"])  # the eager step sets a float rate


def test_optim_eps_reaches_the_optimizer():
    weight = torch.nn.Parameter(torch.ones(2))
    assert build_optimizer([weight], "adam", 0.1, eps=1e-4).param_groups[0]["eps"] == 1e-4
    assert build_optimizer([weight], "adam", 0.1).param_groups[0]["eps"] == 1e-8  # torch's default


def _trainer(data, tmp_path, *extra):
    # 270 rows in batches of 8: 34 batches an epoch; 150 steps reach epoch 4, where stage 2 starts.
    cfg = load_config(
        SMOKE,
        tiny_overrides(data, str(tmp_path), **{"train.max_steps": 150})
        + ["optim.name=adam", "optim.lr=0.01", "optim.lr_schedule=burda2015", "train.log_every_steps=1", *extra],
    )
    return trainer_for_config(cfg)


def test_the_trainer_steps_each_epoch_at_its_scheduled_rate(tiny_data, tmp_path):
    trainer, seen = _trainer(tiny_data, tmp_path), {}
    trainer.fit(
        on_log=lambda row: seen.setdefault(row["epoch"], set()).add(trainer.optimizer.param_groups[0]["lr"]),
        on_checkpoint=lambda state, row: None,
    )
    assert sorted(seen) == [0, 1, 2, 3, 4]
    for epoch, rates in seen.items():
        assert rates == {learning_rate(0.01, "burda2015", epoch)}  # one rate an epoch, the schedule's
    assert seen[0] != seen[1] == seen[3] != seen[4]


def test_a_resumed_run_takes_the_same_steps_as_an_unbroken_one(tiny_data, tmp_path):
    whole = _trainer(tiny_data, tmp_path / "a")
    whole.fit(on_log=lambda row: None, on_checkpoint=lambda state, row: None)
    saved = []
    first = _trainer(tiny_data, tmp_path / "b", "checkpoint.every_steps=50")
    first.fit(on_log=lambda row: None, on_checkpoint=lambda state, row: saved.append(copy.deepcopy(state)))
    assert saved[0]["state"]["step"] == 50 and saved[0]["state"]["epoch"] == 1  # inside stage 1
    resumed = _trainer(tiny_data, tmp_path / "c")
    resumed.load_state_dict(saved[0])
    resumed.fit(on_log=lambda row: None, on_checkpoint=lambda state, row: None)
    assert resumed.state == whole.state and resumed.state.epoch == 4
    for a, b in zip(whole.params, resumed.params):
        assert torch.equal(a, b)
