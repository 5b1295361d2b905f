"""Run in spawned processes by test_gloo.py: one rank of a real gloo process group."""

import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from aevb_dist.config import load_config
from aevb_dist.data.schema import Batch
from aevb_dist.train.batches import StepBatch
from aevb_dist.train.worker import trainer_for_config


def take_one_step(rank: int, world_size: int, port: int, overrides: list, rows: list, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        trainer = trainer_for_config(load_config(None, overrides), rank=rank, world_size=world_size)
        x = np.load(os.path.join(out, "x.npy"))[rows[rank]]
        elbo_sum, count = trainer.step_on(
            StepBatch.from_host(Batch(x, np.asarray(rows[rank], dtype=np.int64)), trainer.device)
        )
        if rank == 0:
            torch.save(
                {
                    "params": [p.detach().clone() for p in trainer.vae.parameters()],
                    "elbo_sum": elbo_sum,
                    "count": count,
                },
                os.path.join(out, "result.pt"),
            )
        dist.barrier()  # tear the group down together: a rank leaving early can abort its peer in gloo
    finally:
        dist.destroy_process_group()
    _exit_without_finalizing()


def stop_on_one_ranks_vote(rank: int, world_size: int, port: int, overrides: list, out: str) -> None:
    """Only the last rank's probe turns true (at step 5): every rank must stop after the same step."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        trainer = trainer_for_config(load_config(None, overrides), rank=rank, world_size=world_size)
        if rank == world_size - 1:
            trainer.stop_probe = lambda: trainer.state.step >= 5
        saved = []
        trainer.fit(on_log=lambda row: None, on_checkpoint=lambda state, row: saved.append(state["state"]["step"]))
        torch.save(
            {"step": trainer.state.step, "saved": saved, "stopped": trainer.stop_requested},
            os.path.join(out, f"stop{rank}.pt"),
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_without_finalizing()


def _exit_without_finalizing() -> None:
    """Leave with exit code 0 once the result is written and the group destroyed. Interpreter finalization can
    free a tensor still held by one of gloo's C++ threads and abort the process ("terminate called without an
    active exception", SIGABRT, seen once in CI in the bfloat16 case); nothing is left to finalize."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
