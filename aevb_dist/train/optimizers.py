"""The optimizer of a run and its learning-rate schedule (optim.*). No Ray here."""

from __future__ import annotations

import math
from typing import Optional

import torch

from aevb_dist import names


class BurdaAdam(torch.optim.Optimizer):
    """Adam as Burda et al.'s released code runs it (yburda/iwae, optimizers.py), to train their models their
    way: β1 = 0.99 and β2 = 0.999, the second moments starting at 1 (not 0), ε (1e-4) added to the uncorrected
    √v, and the step lr·√(1−β2^t)/(1−β1^t); on the gradient of the bound summed over the minibatch, where the
    trainer's gradient is the minibatch mean: `examples_per_step` scales it back. Its step count lives on the
    host, so the captured CUDA-graph step does not serve it."""

    def __init__(self, params, lr: float, eps: float = 1e-4, betas=(0.99, 0.999), examples_per_step: int = 1):
        super().__init__(params, {"lr": lr, "eps": eps, "betas": tuple(betas), "scale": float(examples_per_step)})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.ones_like(p)  # their shared_ones_like
                state["step"] += 1
                t = state["step"]
                grad = p.grad * group["scale"]
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-step_size)


OPTIMIZERS = {
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
    "adam_burda2015": BurdaAdam,
    "sgd": torch.optim.SGD,
}
names.require_registry("optimizer", names.OPTIMIZERS, OPTIMIZERS)


def build_optimizer(
    params,
    name: str,
    lr: float,
    on_gpu: bool = False,
    eps: Optional[float] = None,
    examples_per_step: int = 1,
) -> torch.optim.Optimizer:
    """`on_gpu`: Adam is the fused implementation (one kernel for every parameter where the foreach one
    takes several, measured on an H100), capturable (its step count on the device, so a CUDA graph replays it),
    with its learning rate a device tensor (a captured graph reads it, so `set_learning_rate` reaches the
    replays). `eps`: the optimizer's ε where given, else its default. `examples_per_step`: the examples whose
    mean gradient each step takes (adam_burda2015 steps on their sum)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is not one of: {', '.join(OPTIMIZERS)}")
    params = list(params)
    options = {} if eps is None else {"eps": eps}
    if name == "adam_burda2015":
        return BurdaAdam(params, lr=lr, examples_per_step=examples_per_step, **options)
    if on_gpu and name == "adam":
        return OPTIMIZERS[name](
            params, lr=torch.tensor(lr, device=params[0].device), fused=True, capturable=True, **options
        )
    return OPTIMIZERS[name](params, lr=lr, **options)


def examples_per_step(train_cfg, world_size: int) -> int:
    """The examples a step's (mean) gradient is taken over: the global batch, or every worker's batch."""
    return train_cfg.global_batch_size or train_cfg.batch_size_per_worker * world_size


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
