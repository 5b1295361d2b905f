"""Your own encoder and decoder for aevb_dist: `model.architecture=configs.my_networks:build`.

aevb_dist imports "package.module:function" on the driver and on every worker (so the module must be
importable there: installed, or on PYTHONPATH) and calls

    build(model_cfg, input_shape, params_per_dim) -> (encoder, decoder)

with the config's `model` section, one example's shape (e.g. (1, 28, 28) or (28, 28)) and the number of
decoder outputs per pixel that `model.likelihood` needs (1 for bernoulli and continuous_bernoulli: logits;
2 for gaussian: mean and log-variance). The two modules must map

    encoder: x [B, *input_shape]  ->  [B, 2 * latent_dim]   (the two parameters per latent of q(z|x))
    decoder: z [N, latent_dim]    ->  [N, params_per_dim, *input_shape]

which aevb_dist checks on a dry run before any worker starts. Everything else — estimators A/B/IWAE,
MAP, evaluation, encode, plots, checkpoints and resume — is the same as for the built-in networks.
This one is an MLP with layer normalization; a convolutional one would read x as images directly.
"""

import math

from torch import nn


def build(model_cfg, input_shape, params_per_dim):
    pixels, latent = math.prod(input_shape), model_cfg.latent_dim
    width = model_cfg.hidden_sizes[0] if model_cfg.hidden_sizes else 256
    encoder = nn.Sequential(
        nn.Flatten(), nn.Linear(pixels, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, 2 * latent)
    )
    decoder = nn.Sequential(
        nn.Linear(latent, width),
        nn.GELU(),
        nn.LayerNorm(width),
        nn.Linear(width, params_per_dim * pixels),
        nn.Unflatten(1, (params_per_dim, *input_shape)),
    )
    return encoder, decoder
