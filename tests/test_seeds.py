"""Seed rules (aevb_dist/seeds.py) as the computations use them."""

from aevb_dist.config import load_config
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.eval.evaluation import evaluate_units
from aevb_dist.model.vae import VAE
from tests.helpers import tiny_overrides


def test_a_row_groups_elbo_noise_does_not_depend_on_the_importance_samples(tiny_data, tmp_path):
    """The ELBO and the log p(x) estimate draw from streams of their own: training's test-set evaluation
    (no log p(x)) and `aevb-dist evaluate` (K samples) give the same ELBO, also where a row group spans
    several batches."""
    cfg = load_config(None, tiny_overrides(tiny_data, str(tmp_path)))
    vae = VAE.from_config(cfg.model, seed=0)
    data = ParquetDataset(f"{tiny_data}/train")
    ids = list(range(len(data.units)))
    assert max(u.num_rows for u in data.units) > 5  # row groups of several batches of 5
    elbo_only = evaluate_units(vae, data, ids, num_importance_samples=0, batch_size=5, seed=3)
    with_log_px = evaluate_units(vae, data, ids, num_importance_samples=7, batch_size=5, seed=3)
    assert with_log_px.elbo == elbo_only.elbo and with_log_px.elbo_sq == elbo_only.elbo_sq
    assert with_log_px.log_px != 0.0
    other_seed = evaluate_units(vae, data, ids, num_importance_samples=0, batch_size=5, seed=4)
    assert other_seed.elbo != elbo_only.elbo
    assert elbo_only.count == with_log_px.count == data.num_rows
