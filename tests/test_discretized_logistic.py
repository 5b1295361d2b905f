"""model.likelihood=discretized_logistic: 8-bit pixels as 256 bins of a logistic, log p(x) in bits/dim."""

import math

import numpy as np
import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.data.prepare import prepare
from aevb_dist.model.distributions import DiscretizedLogisticLikelihood
from aevb_dist.train.driver import train
from tests.helpers import SMOKE, tiny_overrides

LEVELS = torch.arange(256, dtype=torch.float32).view(256, 1) / 255  # what the reader gives for bytes 0..255


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (0.7, -5.0), (-1.3, 0.8), (1.0, -9.0), (0.2, -7.0)])
def test_the_256_bins_are_a_probability_mass_function(mean, log_scale):
    out = torch.tensor([[mean, log_scale]]).expand(256, 2)
    log_p = DiscretizedLogisticLikelihood().log_prob(out, LEVELS)
    assert torch.isfinite(log_p).all() and (log_p <= 1e-6).all()
    assert torch.exp(log_p).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_gradients_stay_finite_at_the_end_bins_and_in_far_tails():
    out = torch.tensor([[0.0, -7.0], [-1.0, -7.0], [0.9, 3.0], [-20.0, -7.0]], requires_grad=True)
    x = torch.tensor([[0.0], [1.0], [0.5], [1.0]])  # the lowest bin, the highest, a middle one, a far tail
    log_p = DiscretizedLogisticLikelihood().log_prob(out, x)
    log_p.sum().backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(out.grad).all()


def _eight_bit(tmp_path) -> str:
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, size=(4, 4, 4))
    pixels = np.clip(protos[rng.integers(0, 4, 300)] + rng.integers(-12, 13, size=(300, 4, 4)), 0, 255)
    np.save(tmp_path / "bytes.npy", pixels.astype(np.uint8))
    prepare(
        str(tmp_path / "bytes.npy"), str(tmp_path / "bytes"), num_shards=2, rows_per_row_group=16, report=lambda m: None
    )
    return str(tmp_path / "bytes")


@pytest.mark.slow
def test_a_model_of_8_bit_data_learns_and_reports_bits_per_dim(tmp_path):
    from aevb_dist.eval.jobs import evaluate

    data = _eight_bit(tmp_path)
    common = tiny_overrides(
        data,
        str(tmp_path / "runs"),
        **{
            "model.likelihood": "discretized_logistic",
            "optim.name": "adam",
            "optim.lr": 0.01,
            "ray.local_mode": "true",
            "train.num_workers": 2,
            "train.max_steps": 300,
            "train.eval_every_steps": 0,
            "checkpoint.every_steps": 100,
        },
    )
    last = train(load_config(SMOKE, common))
    result = evaluate(str(tmp_path / "runs" / "smoke"), f"{data}/test", num_importance_samples=20, num_workers=1)
    bits = result["log_marginal_likelihood_bits_per_dim"]
    assert bits == pytest.approx(-result["log_marginal_likelihood"] / (16 * math.log(2)))
    assert result["elbo_bits_per_dim"] >= bits  # the bound is below log p(x): more bits
    assert bits < 7.0  # under a uniform pmf's 8 bits (5.6 measured; prototypes ± 12 levels: ~4.6 ideal)
    assert last["test_elbo"] > -16 * 8 * math.log(2)


def test_data_not_recorded_as_8_bit_is_refused_in_one_line(tmp_path, tiny_data):
    cfg = load_config(SMOKE, tiny_overrides(tiny_data, str(tmp_path), **{"model.likelihood": "discretized_logistic"}))
    with pytest.raises(ValueError, match=r"discretized_logistic models 8-bit pixels .* value range \[0, 1\]"):
        train(cfg)
