"""KL warm-up (train.kl_warmup_steps) and free bits (train.free_bits): what is optimized changes, the logged
train ELBO stays the true bound."""

import math

import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.model.elbo import sgvb_b, sgvb_b_terms, weighted_kl_objective
from aevb_dist.model.vae import VAE
from aevb_dist.train.worker import trainer_for_config
from tests.helpers import SMOKE, tiny_overrides


@pytest.mark.parametrize("posterior", ["gaussian", "laplace", "logistic"])
def test_estimator_bs_terms_make_the_bound_and_beta_one_without_free_bits_is_the_bound(posterior):
    vae = VAE(16, [8], 3, posterior=posterior)
    x = torch.rand(5, 16).round()
    log_likelihood_B, kl_BZ = sgvb_b_terms(vae, x, 2, generator=torch.Generator().manual_seed(1))
    bound = sgvb_b(vae, x, 2, generator=torch.Generator().manual_seed(1))
    assert kl_BZ.shape == (5, 3) and (kl_BZ >= -1e-6).all()
    torch.testing.assert_close(log_likelihood_B - kl_BZ.sum(-1), bound)
    torch.testing.assert_close(weighted_kl_objective(log_likelihood_B, kl_BZ, 1.0, None), bound)


def test_free_bits_hold_the_latents_under_lambda_at_lambda_with_no_gradient():
    kl_BZ = torch.tensor([[0.1, 2.0, 0.3], [0.2, 4.0, 0.9]], requires_grad=True)  # batch means 0.15, 3.0, 0.6
    log_likelihood_B = torch.tensor([-10.0, -20.0])
    objective_B = weighted_kl_objective(log_likelihood_B, kl_BZ, 0.5, free_bits=0.5)
    torch.testing.assert_close(objective_B, log_likelihood_B - 0.5 * torch.tensor([0.5 + 2.0 + 0.3, 0.5 + 4.0 + 0.9]))
    objective_B.sum().backward()
    torch.testing.assert_close(kl_BZ.grad, torch.tensor([[0.0, -0.5, -0.5], [0.0, -0.5, -0.5]]))


def _fit(tiny_data, tmp_path, *extra: str) -> list[dict]:
    overrides = tiny_overrides(tiny_data, str(tmp_path), **{"train.max_steps": 12, "train.log_every_steps": 4})
    trainer, rows = trainer_for_config(load_config(SMOKE, overrides + list(extra))), []
    trainer.fit(on_log=rows.append, on_checkpoint=lambda state, row: None)
    return rows


def test_a_warm_up_optimizes_a_weaker_kl_and_logs_the_true_bound(tiny_data, tmp_path):
    plain = _fit(tiny_data, tmp_path / "a")
    warm = _fit(tiny_data, tmp_path / "b", "train.kl_warmup_steps=100", "train.free_bits=0.1")
    assert all(math.isnan(r["train_objective"]) for r in plain)  # the bound itself was optimized
    assert warm[0]["step"] == 1 and plain[0]["step"] == 1
    # Step 1 draws the same noise from the same parameters: the logged ELBO is the bound's, the objective
    # (β = 0 at the first step: no KL at all) is above it.
    assert warm[0]["train_elbo"] == pytest.approx(plain[0]["train_elbo"], rel=1e-6)
    for row in warm:
        assert row["train_objective"] > row["train_elbo"]
    assert warm[-1]["train_elbo"] != pytest.approx(plain[-1]["train_elbo"], rel=1e-6)  # it trained otherwise


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.kl_warmup_steps=10", "train.estimator=iwae"], "set train.estimator=B"),
        (["train.free_bits=0.5", "train.global_batch_size=8"], "depends on the worker count"),
        (["train.kl_warmup_steps=-1"], "must be >= 0"),
        (
            ["train.kl_warmup_steps=5", "train.use_gpu=true", "data.cache_on_device=true", "optim.name=adam"],
            "set train.cuda_graph=false",
        ),
    ],
)
def test_kl_weighting_that_cannot_apply_is_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(SMOKE, overrides)
