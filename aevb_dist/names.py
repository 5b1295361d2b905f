"""Every name a config or a command may hold, listed once. Pure Python, no torch.

The config validates against these lists (so a bad value is refused before torch is imported:
`aevb-dist config` and `--help` stay fast), and each torch registry checks at import that it
implements exactly the names listed here (`require_registry`), so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Iterable

ACTIVATIONS = ("tanh", "relu", "softplus", "sigmoid", "elu")
IMAGE_LIKELIHOODS = ("bernoulli", "gaussian", "continuous_bernoulli", "discretized_logistic")
COUNT_LIKELIHOODS = ("poisson", "negative_binomial", "zinb", "multinomial")  # counts: cells' genes, documents' words
LIKELIHOODS = IMAGE_LIKELIHOODS + COUNT_LIKELIHOODS
POSTERIORS = ("gaussian", "gaussian_log_std", "laplace", "logistic", "kumaraswamy", "lognormal")
ESTIMATORS = ("A", "B", "iwae")  # the training bound: SGVB A, SGVB B, or the IWAE bound
OPTIMIZERS = ("adagrad", "adam", "adam_burda2015", "sgd")
# optim.lr_schedule: "burda2015" is Burda et al. (2015) §5: optim.lr·10^(−i/7) for 3^i epochs, i = 0…7
LR_SCHEDULES = ("constant", "burda2015")
BINARIZATIONS = ("dynamic", "static", "none")
MARGINAL_LIKELIHOOD_ESTIMATORS = ("is", "ais", "appendix-d")  # log p(x): `aevb-dist evaluate --estimator`
ALLREDUCE_DTYPES = ("float32", "bfloat16")
WEIGHT_INITS = ("default", "glorot_uniform")  # model.init: PyTorch's, or Glorot & Bengio (2010)'s uniform
OUTPUT_BIAS_INITS = ("default", "zero", "data_mean")  # model.output_bias_init
# Examples per forward pass of an evaluation (`aevb-dist evaluate --batch-size`'s default), and of training's
# test-set evaluation: a row group's noise is drawn batch by batch, so the ELBO's draws depend on it.
EVAL_BATCH_SIZE = 100
AUTOCAST_DTYPES = ("none", "bfloat16")
ON_NONFINITE = ("error", "skip")
DATASET_FORMATS = (
    "mnist",
    "fashion-mnist",
    "frey-face",
    "npy",
    "imagefolder",
    "parquet",
    "h5ad",
    "10x",
    "npz",
)  # `aevb-dist prepare --format`: images, then count matrices (cells × genes)
SPLITS = ("train", "test")  # the folders `aevb-dist prepare` writes under its OUTPUT_URI


def require_registry(kind: str, listed: tuple[str, ...], implemented: Iterable[str]) -> None:
    """Raise at import when a registry implements other names than `listed` (a developer's mistake)."""
    missing, extra = set(listed) - set(implemented), set(implemented) - set(listed)
    if missing or extra:
        raise RuntimeError(
            f"{kind} registry out of step with aevb_dist.names: missing {sorted(missing)}, not listed {sorted(extra)}"
        )
