"""A Ray Train worker's `WorkerContext`, the same under both launchers (a Ray cluster and Ray Train's
local mode): rank and world size from Ray Train's context, and the GPU Ray Train made torch's current one."""

from __future__ import annotations

import torch

from aevb_dist.train.worker import WorkerContext


def from_ray_train(use_gpu: bool) -> WorkerContext:
    import ray.train

    context = ray.train.get_context()
    device = f"cuda:{torch.cuda.current_device()}" if use_gpu else "cpu"
    return WorkerContext(rank=context.get_world_rank(), world_size=context.get_world_size(), device=device)
