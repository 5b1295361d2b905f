"""The two collectives of a step: sums of [gradients..., ELBO sum, count] and of evaluation sums.

Gradients are reduced as sums, never averaged (trainer.py says why); on CPU over gloo, on GPU over NCCL.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(buffer: torch.Tensor) -> torch.Tensor:
    if distributed():
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer


def all_reduce_step_sums(flat: torch.Tensor, grad_dtype: Optional[torch.dtype]) -> None:
    """Sum [gradients..., ELBO sum, count] across ranks in place. With `grad_dtype` (bfloat16) the
    gradients travel compressed, in one all-reduce, and the two scalars in float64, so counts stay exact."""
    if grad_dtype is None or not distributed():
        all_reduce_sum(flat)
        return
    grads = flat[:-2].to(grad_dtype)
    scalars = flat[-2:].double()
    dist.all_reduce(grads, op=dist.ReduceOp.SUM)
    dist.all_reduce(scalars, op=dist.ReduceOp.SUM)
    flat[:-2].copy_(grads)
    flat[-2:].copy_(scalars)
