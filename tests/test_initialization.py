"""model.init and model.output_bias_init: Burda et al.'s initialization, as their code does it."""

import math

import numpy as np
import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.model.vae import VAE
from aevb_dist.train.worker import trainer_for_config
from tests.helpers import SMOKE, read_all, tiny_overrides


def test_glorot_uniform_weights_lie_in_their_bound_with_its_variance_and_zero_biases():
    cfg = load_config(SMOKE, ["model.input_dim=784", "model.hidden_sizes=[200,200]", "model.init=glorot_uniform"])
    vae = VAE.from_config(cfg.model, seed=0)
    layers = [m for m in vae.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 6
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert layer.weight.abs().max() <= bound
        assert layer.weight.var().item() == pytest.approx(bound**2 / 3, rel=0.05)  # U(±b) has variance b²/3
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    default = VAE.from_config(load_config(SMOKE, ["model.input_dim=784", "model.hidden_sizes=[200,200]"]).model, seed=0)
    assert not torch.equal(default.decoder[-1].bias, torch.zeros_like(default.decoder[-1].bias))


def test_a_new_run_starts_its_decoder_at_the_logit_of_the_clipped_data_mean_and_records_it(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data, str(tmp_path), **{"train.max_steps": 1, "optim.name": "sgd"})
    cfg = load_config(SMOKE, overrides + ["model.output_bias_init=data_mean", "optim.lr=1e-30"])
    trainer = trainer_for_config(cfg)
    saved = []
    trainer.fit(on_log=lambda row: None, on_checkpoint=lambda state, row: saved.append(state))
    x = read_all(ParquetDataset(f"{tiny_data}/train")).x.astype(np.float64)
    expected = np.log(np.clip(x.mean(axis=0), 0.001, 0.999) / (1 - np.clip(x.mean(axis=0), 0.001, 0.999)))
    np.testing.assert_allclose(trainer.vae.decoder[-1].bias.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(saved[-1]["data_mean"], x.mean(axis=0), rtol=1e-12)
    # Resumed, the checkpoint's parameters stand: the bias is not set again.
    resumed = trainer_for_config(
        load_config(SMOKE, overrides + ["model.output_bias_init=data_mean", "train.max_steps=2"])
    )
    resumed.load_state_dict(saved[-1])
    with torch.no_grad():
        resumed.vae.decoder[-1].bias.fill_(3.0)
    resumed.fit(on_log=lambda row: None, on_checkpoint=lambda state, row: None)
    assert resumed.vae.decoder[-1].bias.detach().sub(3.0).abs().max() < 1.0  # one SGD step away from 3, not reset


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.output_bias_init=data_mean", "model.likelihood=gaussian"], "needs model.likelihood=bernoulli"),
        (["model.init=glorot_uniform", "model.init_std=0.01"], "both set the weights"),
        (["model.init=glorot_uniform", "model.architecture=conv"], "applies to model.architecture=mlp"),
        (["model.output_bias_init=median"], "model.output_bias_init='median' is not allowed"),
    ],
)
def test_initializations_that_cannot_apply_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(SMOKE, overrides)
