"""The two collectives of a step: sums of [gradients..., ELBO sum, count, stop votes] and of evaluation sums.

Gradients are reduced as sums, never averaged (trainer.py says why); on CPU over gloo, on GPU over NCCL.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# The flat buffer's tail, after the gradients: the step's optimized objective's sum (the ELBO's but with KL
# warm-up or free bits), its ELBO sum, its example count, and how many ranks ask to stop after this step (a
# preemption notice, Ctrl-C or SIGTERM; trainer.py). The vote rides on the gradients' all-reduce, so every
# rank learns it at the same step, at no cost.
OBJECTIVE_SUM, ELBO_SUM, COUNT, STOP_VOTES = -4, -3, -2, -1
NUM_SCALARS = 4


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(buffer: torch.Tensor) -> torch.Tensor:
    if distributed():
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer


def all_reduce_step_sums(flat: torch.Tensor, grad_dtype: Optional[torch.dtype]) -> None:
    """Sum [gradients..., ELBO sum, count, stop votes] across ranks in place. With `grad_dtype` (bfloat16) the
    gradients travel compressed, in one all-reduce, and the scalars in float64, so counts stay exact."""
    if grad_dtype is None or not distributed():
        all_reduce_sum(flat)
        return
    grads = flat[:-NUM_SCALARS].to(grad_dtype)
    scalars = flat[-NUM_SCALARS:].double()
    dist.all_reduce(grads, op=dist.ReduceOp.SUM)
    dist.all_reduce(scalars, op=dist.ReduceOp.SUM)
    flat[:-NUM_SCALARS].copy_(grads)
    flat[-NUM_SCALARS:].copy_(scalars)


# How a collective fails on a rank whose peer died mid-step (its process killed, its node lost): gloo's
# transport errors, and NCCL's once its watchdog aborts the communicator.
PEER_LOST_WORDS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "remote process exited or there was a network error",
)


def peer_lost_in(err: Optional[BaseException]) -> Optional[str]:
    """The words of a collective's failure because a peer was lost, in `err` or what it wraps (`.cause`, as Ray
    wraps a worker's error, and `__cause__`); None where `err` is no such failure."""
    while err is not None:
        found = next((words for words in PEER_LOST_WORDS if words in str(err)), None)
        if found is not None and isinstance(err, RuntimeError):  # torch's DistBackendError is one
            return found
        err = getattr(err, "cause", None) or err.__cause__
    return None
