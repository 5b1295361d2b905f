"""`evaluate`'s active units (Burda et al. §5.2): latents u with Cov_x(E_q[z_u | x]) > 10⁻²."""

import numpy as np
import torch

from aevb_dist.config import load_config
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.eval.evaluation import evaluate_units
from aevb_dist.model.vae import VAE
from tests.helpers import read_all, tiny_overrides


def test_a_latent_whose_posterior_mean_ignores_x_is_inactive_and_one_that_follows_x_is_active(tiny_data, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_data, str(tmp_path), **{"model.latent_dim": 3}))
    vae = VAE.from_config(cfg.model, seed=0)
    last = vae.encoder[-1]  # rows 0..2: the latents' means μ_u; rows 3..5: their log-variances
    with torch.no_grad():
        last.weight[1].zero_()  # μ_1 = its bias, whatever x: inactive
        last.weight[0].mul_(100.0)  # μ_0 moves with x: active
        last.weight[2].mul_(1e-3)  # μ_2 moves, by less than the threshold's square root
    data = ParquetDataset(f"{tiny_data}/train")
    ids = list(range(len(data.units)))
    sums = evaluate_units(vae, data, ids, num_importance_samples=0, binarization="none", seed=0)
    with torch.no_grad():
        means = vae.encode(torch.from_numpy(read_all(data).x))[0].double().numpy()
    np.testing.assert_allclose(sums.posterior_mean_variance(), means.var(axis=0, ddof=1), rtol=1e-6, atol=1e-12)
    variances = means.var(axis=0, ddof=1)
    assert variances[0] > 1e-2 and variances[1] < 1e-12 and 0 < variances[2] < 1e-2
    assert sums.summary()["active_units"] == 1
    assert sums.active_units_by_layer([1, 2]) == [1, 0] and sums.active_units_by_layer([2, 1]) == [1, 0]
    assert sums.active_units_by_layer([1, 1, 1]) == [1, 0, 0]
