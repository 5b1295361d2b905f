"""Gradients reduced as sums over a real gloo process group equal the global-minibatch gradient."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from aevb_dist.config import load_config
from aevb_dist.model.elbo import map_objective_sum, per_example_bound
from aevb_dist.train.trainer import step_generator
from aevb_dist.train.worker import trainer_for_config
from tests.gloo_worker import stop_on_one_ranks_vote, take_one_step
from tests.helpers import free_port, tiny_overrides

pytestmark = pytest.mark.slow  # two processes in a real gloo group


@pytest.mark.parametrize(
    "rows,dtype",
    [
        ([list(range(0, 7)), list(range(7, 10))], "float32"),  # uneven
        ([list(range(0, 10)), []], "float32"),  # one rank empty
        ([list(range(0, 7)), list(range(7, 10))], "bfloat16"),
    ],
)
def test_sum_reduced_gradient_is_the_global_mean_gradient(tiny_data, tmp_path, rows, dtype):
    overrides = tiny_overrides(
        tiny_data,
        str(tmp_path),
        **{"optim.name": "sgd", "optim.lr": 1.0, "train.theta_prior_std": 2.0, "train.allreduce_dtype": dtype},
    )
    x = np.random.default_rng(0).random((10, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mp.spawn(take_one_step, args=(2, free_port(), overrides, rows, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "result.pt")

    # The same step by hand in one process: each rank's examples with that rank's noise, summed, divided once.
    ref = trainer_for_config(load_config(None, overrides))
    before = [p.detach().clone() for p in ref.vae.parameters()]
    total = 0.0
    objective = 0.0
    for rank, idx in enumerate(rows):
        if idx:
            elbo = per_example_bound(
                ref.vae,
                torch.from_numpy(x[idx]),
                "B",
                1,
                generator=step_generator(ref.seed, 0, rank, torch.device("cpu")),
            ).sum()
            objective = objective + map_objective_sum(elbo, ref.vae, 2.0, len(idx), ref.source.data.num_rows)
            total += elbo.item()
    grads = torch.autograd.grad(objective / 10, list(ref.vae.parameters()))
    assert got["count"] == 10
    assert got["elbo_sum"] == pytest.approx(total, rel=1e-5)
    for p0, g, p1 in zip(before, grads, got["params"]):  # SGD, lr=1, ascent on the objective
        if dtype == "float32":
            torch.testing.assert_close(p1, p0 + g, rtol=1e-5, atol=1e-6)
        else:  # bfloat16 keeps 8 significant bits of each rank's summed gradient (errors of 2⁻⁹ of its scale)
            torch.testing.assert_close(p1 - p0, g, rtol=2e-2, atol=1e-2 * g.abs().max().item())
        assert not torch.equal(p1, p0)


def test_one_ranks_stop_vote_stops_every_rank_after_the_same_step(tiny_data, tmp_path):
    """A preemption notice or a stop request seen by one rank only: the vote rides on the step's all-reduce,
    so both ranks checkpoint step 6 and return (a rank that went on would hang its peer's next all-reduce)."""
    overrides = tiny_overrides(tiny_data, str(tmp_path), **{"train.max_steps": 30, "checkpoint.every_steps": 4})
    mp.spawn(stop_on_one_ranks_vote, args=(2, free_port(), overrides, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"stop{rank}.pt")
        assert got == {"step": 6, "saved": [4, 6], "stopped": True}, (rank, got)
