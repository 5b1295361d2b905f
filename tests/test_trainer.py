"""The Trainer in one process: it keeps its randomness to itself."""

import torch

from aevb_dist.config import load_config
from aevb_dist.model.vae import VAE
from aevb_dist.train.trainer import Trainer
from tests.helpers import SMOKE, tiny_overrides


def test_building_a_trainer_leaves_torchs_global_random_state_alone(tiny_data, tmp_path):
    cfg = load_config(SMOKE, tiny_overrides(tiny_data, str(tmp_path)))
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = Trainer(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(99)  # another global state: the initial parameters are the seed's all the same
    second = Trainer(cfg)
    for a, b in zip(first.params, second.params):
        assert torch.equal(a, b)
    other = Trainer(load_config(SMOKE, tiny_overrides(tiny_data, str(tmp_path)) + ["seed=1"]))
    assert not torch.equal(first.params[0], other.params[0])


def test_the_seeded_model_equals_the_one_torchs_global_seed_used_to_build():
    cfg = load_config(SMOKE, ["model.input_dim=6", "model.hidden_sizes=[5]", "model.latent_dim=2", "seed=7"])
    torch.manual_seed(7)
    reference = VAE.from_config(cfg.model)  # what the trainer built before it stopped reseeding torch
    seeded = VAE.from_config(cfg.model, seed=7, validate_inputs=False)
    for a, b in zip(reference.parameters(), seeded.parameters()):
        assert torch.equal(a, b)
    assert reference.validate_inputs and not seeded.validate_inputs
