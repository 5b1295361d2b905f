"""What the Trainer builds before its first step: the datasets, the optimizer, bf16 autocast of the
networks, and the seed rule of each step's noise. No Ray here."""

from __future__ import annotations

from typing import Optional

import torch

from aevb_dist import names, seeds
from aevb_dist.config import Config
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.model.vae import VAE

OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
names.require_registry("optimizer", names.OPTIMIZERS, OPTIMIZERS)


def build_optimizer(
    params, name: str, lr: float, on_gpu: bool = False, eps: Optional[float] = None
) -> torch.optim.Optimizer:
    """`on_gpu`: Adam is the fused implementation (one kernel for every parameter where the foreach one
    takes several, measured on an H100), capturable (its step count on the device, so a CUDA graph replays it),
    with its learning rate a device tensor (a captured graph reads it, so `set_learning_rate` reaches the
    replays). `eps`: the optimizer's ε where given, else torch's default."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is not one of: {', '.join(OPTIMIZERS)}")
    params = list(params)
    options = {} if eps is None else {"eps": eps}
    if on_gpu and name == "adam":
        return OPTIMIZERS[name](
            params, lr=torch.tensor(lr, device=params[0].device), fused=True, capturable=True, **options
        )
    return OPTIMIZERS[name](params, lr=lr, **options)


def _burda2015(lr: float, epoch: int) -> float:
    """Burda et al. (2015), §5: lr·10^(−i/7) for 3^i epochs, i = 0…7 (1 + 3 + … + 2187 = 3,280 epochs),
    and the last rate after those."""
    stage, stage_end = 0, 1  # epochs [0, stage_end) are stages 0…stage
    while epoch >= stage_end and stage < 7:
        stage += 1
        stage_end += 3**stage
    return lr * 10 ** (-stage / 7)


LR_SCHEDULES = {"constant": lambda lr, epoch: lr, "burda2015": _burda2015}
names.require_registry("learning-rate schedule", names.LR_SCHEDULES, LR_SCHEDULES)


def learning_rate(lr: float, schedule: str, epoch: int) -> float:
    """The learning rate of epoch `epoch` (0-based) under optim.lr_schedule `schedule`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"optim.lr_schedule={schedule!r} is not one of: {', '.join(LR_SCHEDULES)}")
    return LR_SCHEDULES[schedule](lr, epoch)


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Every group's rate to `value`: in place where it is a tensor (what a captured CUDA graph reads)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def autocast_networks(vae: VAE, device: torch.device) -> None:
    """bf16 autocast for the encoder's and decoder's matrix products only: their outputs return to float32,
    so the noise ε, the likelihood, the KL and every sum stay float32."""
    for network in (vae.encoder, vae.decoder):

        def forward(x, _inner=network.forward):
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):  # CUDA-graph safe
                out = _inner(x)
            return out.float()

        network.forward = forward


def step_generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    """Step `step`'s noise on rank (or partition) `stream`, by the rule in seeds.py."""
    return torch.Generator(device=device).manual_seed(seeds.step_seed(seed, step, stream))


def open_datasets(
    cfg: Config, train_description: Optional[dict] = None
) -> tuple[ParquetDataset, Optional[ParquetDataset]]:
    """The training and test sets; the training set from `train_description` (the driver's) where given."""
    endpoint = cfg.run.s3_endpoint_url
    if not cfg.data.train_uri:
        raise ValueError("data.train_uri is empty; point it at a dataset made by `aevb-dist prepare`")
    # data.cache_on_device holds the training set on the device already: no second copy in host memory.
    cache_mib = 0 if cfg.data.cache_on_device else cfg.data.decoded_cache_mib
    train = ParquetDataset(
        cfg.data.train_uri,
        expected_dim=cfg.model.input_dim,
        endpoint_url=endpoint,
        description=train_description,
        image_column=cfg.data.image_column,
        cache_bytes=cache_mib << 20,
    )
    test = (
        ParquetDataset(
            cfg.data.test_uri,
            expected_dim=cfg.model.input_dim,
            endpoint_url=endpoint,
            image_column=cfg.data.image_column,
        )
        if cfg.data.test_uri
        else None
    )
    return train, test
