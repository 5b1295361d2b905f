"""The optimizer of a run and its learning-rate schedule (optim.*). No Ray here."""

from __future__ import annotations

from typing import Optional

import torch

from aevb_dist import names

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
