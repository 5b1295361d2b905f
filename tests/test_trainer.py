"""The Trainer in one process: it keeps its randomness to itself."""

import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.model.vae import VAE
from aevb_dist.train.trainer import NonFiniteError, Trainer
from aevb_dist.train.worker import trainer_for_config
from tests.helpers import SMOKE, tiny_overrides


def test_building_a_trainer_leaves_torchs_global_random_state_alone(tiny_data, tmp_path):
    cfg = load_config(SMOKE, tiny_overrides(tiny_data, str(tmp_path)))
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = trainer_for_config(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(99)  # another global state: the initial parameters are the seed's all the same
    second = trainer_for_config(cfg)
    for a, b in zip(first.params, second.params):
        assert torch.equal(a, b)
    other = trainer_for_config(load_config(SMOKE, tiny_overrides(tiny_data, str(tmp_path)) + ["seed=1"]))
    assert not torch.equal(first.params[0], other.params[0])


def test_the_seeded_model_equals_the_one_torchs_global_seed_used_to_build():
    cfg = load_config(SMOKE, ["model.input_dim=6", "model.hidden_sizes=[5]", "model.latent_dim=2", "seed=7"])
    torch.manual_seed(7)
    reference = VAE.from_config(cfg.model)  # what the trainer built before it stopped reseeding torch
    seeded = VAE.from_config(cfg.model, seed=7, validate_inputs=False)
    for a, b in zip(reference.parameters(), seeded.parameters()):
        assert torch.equal(a, b)
    assert reference.validate_inputs and not seeded.validate_inputs


def _fit_with_a_stop_at(trainer: Trainer, ask_at_step: int, fit=None) -> tuple[list, list]:
    """Fit, with the probe turning true while step `ask_at_step` + 1 is taken; returns (checkpoint steps,
    logged steps)."""
    saved, logged = [], []
    trainer.stop_probe = lambda: trainer.state.step >= ask_at_step
    (fit or trainer.fit)(
        on_log=lambda row: logged.append(row["step"]),
        on_checkpoint=lambda state, row: saved.append(state["state"]["step"]),
    )
    return saved, logged


def test_a_stop_request_checkpoints_the_step_it_was_seen_in_and_ends_the_loop(tiny_data, tmp_path):
    """Ctrl-C / SIGTERM / a preemption notice: the step being taken is finished, checkpointed and logged,
    and fit returns there (not at the next checkpoint interval, nor at the end)."""
    cfg = load_config(
        SMOKE,
        tiny_overrides(
            tiny_data,
            str(tmp_path),
            **{"train.max_steps": 40, "checkpoint.every_steps": 10, "train.log_every_steps": 10},
        ),
    )
    trainer = trainer_for_config(cfg)
    saved, logged = _fit_with_a_stop_at(trainer, 13)
    assert trainer.stop_requested and trainer.state.step == 14
    assert saved == [10, 14] and logged == [1, 10, 14]
    never = trainer_for_config(cfg)  # no probe: to the end
    never.fit(on_log=lambda row: None, on_checkpoint=lambda state, row: None)
    assert not never.stop_requested and never.state.step == 40


def test_the_captured_loop_stops_at_the_log_line_after_the_request(tiny_data, tmp_path):
    """The CUDA-graph loop reads the reduced stop votes where it syncs anyway, at log lines (run uncaptured
    here, on the CPU)."""
    from aevb_dist.train.captured_step import CapturedSteps

    cfg = load_config(
        SMOKE,
        tiny_overrides(
            tiny_data,
            str(tmp_path),
            **{
                "train.max_steps": 40,
                "checkpoint.every_steps": 20,
                "train.log_every_steps": 5,
                "data.cache_on_device": "true",
            },
        ),
    )
    trainer = trainer_for_config(cfg)
    saved, logged = _fit_with_a_stop_at(trainer, 11, fit=lambda **kw: trainer.fit(steps=CapturedSteps(trainer), **kw))
    assert trainer.state.step == 15 and saved == [15] and logged == [1, 5, 10, 15]


def test_the_captured_loop_counts_a_non_finite_step_and_stops_at_the_next_log_line(tiny_data, tmp_path):
    """The eager step's rule (Trainer.step_finite), counted on the device and read where the loop syncs anyway:
    step 1's update is huge but finite and is logged; a later step goes non-finite, told at the next log line."""
    from aevb_dist.train.captured_step import CapturedSteps

    overrides = {
        "train.max_steps": 40,
        "checkpoint.every_steps": 20,
        "train.log_every_steps": 5,
        "data.cache_on_device": "true",
        "optim.name": "sgd",
        "optim.lr": 1e30,
    }
    trainer = trainer_for_config(load_config(SMOKE, tiny_overrides(tiny_data, str(tmp_path), **overrides)))
    logged = []
    with pytest.raises(NonFiniteError, match=r"non-finite .* at \d+ step\(s\) up to step 5 \(captured CUDA graph"):
        trainer.fit(
            on_log=lambda row: logged.append(row["step"]),
            on_checkpoint=lambda state, row: None,
            steps=CapturedSteps(trainer),
        )
    assert logged == [1]
