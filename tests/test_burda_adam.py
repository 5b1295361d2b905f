"""optim.name=adam_burda2015: Adam as Burda et al.'s released code (yburda/iwae, optimizers.py) updates."""

import copy
import math

import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.train.optimizers import BurdaAdam, build_optimizer
from aevb_dist.train.worker import trainer_for_config
from tests.helpers import SMOKE, tiny_overrides


def _their_updates(theta: float, gradients_of_the_mean: list[float], lr: float, batch: int) -> list[float]:
    """Their rule, written out for one scalar: gradient ascent on the bound summed over the minibatch, first
    moments from 0 with β1 = 0.99, second moments from 1 with β2 = 0.999, ε = 1e-4 on the uncorrected √v."""
    m, v, out = 0.0, 1.0, []
    for t, g_mean in enumerate(gradients_of_the_mean, start=1):
        g_bound_sum = -g_mean * batch  # the trainer descends −(mean bound); they ascend the summed bound
        m = 0.99 * m + 0.01 * g_bound_sum
        v = 0.999 * v + 0.001 * g_bound_sum**2
        theta += lr * math.sqrt(1 - 0.999**t) / (1 - 0.99**t) * m / (math.sqrt(v) + 1e-4)
        out.append(theta)
    return out


def test_its_steps_are_the_released_codes_on_the_summed_gradient():
    gradients = [0.3, -1.2, 0.05, 2.0, -0.7]
    p = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    optimizer = build_optimizer([p], "adam_burda2015", 1e-3, examples_per_step=20)
    assert isinstance(optimizer, BurdaAdam)
    taken = []
    for g in gradients:
        p.grad = torch.tensor([g], dtype=torch.float64)
        optimizer.step()
        taken.append(p.item())
    assert taken == pytest.approx(_their_updates(0.5, gradients, 1e-3, 20), rel=1e-12)


def test_a_resumed_optimizer_takes_the_same_next_step():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(a.detach().clone())
    first = BurdaAdam([a], lr=1e-2, examples_per_step=100)
    for _ in range(3):
        a.grad = torch.randn(4)
        first.step()
    b.data.copy_(a.data)
    second = BurdaAdam([b], lr=1e-2, examples_per_step=100)
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # as from a checkpoint file
    a.grad = torch.randn(4)
    b.grad = a.grad.clone()
    first.step()
    second.step()
    assert torch.equal(a, b) and second.state[b]["step"] == 4


def test_the_trainer_steps_on_the_sum_over_every_workers_batch(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data, str(tmp_path), **{"optim.name": "adam_burda2015", "optim.lr": 1e-3})
    trainer = trainer_for_config(load_config(SMOKE, overrides), world_size=1)
    assert trainer.optimizer.param_groups[0]["scale"] == 8 and trainer.optimizer.param_groups[0]["eps"] == 1e-4
    globally = load_config(SMOKE, overrides + ["train.global_batch_size=20"])
    assert trainer_for_config(globally).optimizer.param_groups[0]["scale"] == 20


def test_the_captured_step_does_not_serve_it():
    with pytest.raises(ValueError, match="optim.name=adam_burda2015 keeps its step count on the host"):
        load_config(
            SMOKE,
            ["optim.name=adam_burda2015", "train.use_gpu=true", "data.cache_on_device=true", "train.cuda_graph=true"],
        )
