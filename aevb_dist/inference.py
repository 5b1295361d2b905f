"""`aevb-dist evaluate` and `aevb-dist encode`: the paper's other two aims at dataset scale.

The driver deals chunks of row groups to Ray tasks (at most `num_workers` at once), each
task computes sums (evaluate) or writes one Parquet part (encode), and the driver adds
the sums and divides once. Every row group is computed exactly once.
"""

from __future__ import annotations

import io
import json
import math
import uuid
from typing import Optional

import numpy as np
import torch

from aevb_dist import checkpoint, storage
from aevb_dist.config import config_from_dict
from aevb_dist.dataset import ParquetDataset
from aevb_dist.evaluation import Sums, encode_units, eval_binarization, evaluate_units
from aevb_dist.marginal_likelihood import ESTIMATORS as ML_ESTIMATORS
from aevb_dist.ray_runtime import Progress, cluster_cpus, run_tasks, say, start_ray, stop_ray
from aevb_dist.vae import VAE


def absolute(uri: str) -> str:
    """Ray tasks may run in another folder: local paths are made absolute on the driver."""
    return storage.resolve(uri)[1] if storage.scheme_of(uri) == "file" else uri


def find_checkpoint(uri: str, endpoint_url: Optional[str] = None) -> tuple[object, str]:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    fs, path = storage.resolve(uri, endpoint_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {uri}")
    if fs.exists(f"{path}/{checkpoint.MANIFEST}"):
        return fs, path
    latest = checkpoint.latest(fs, path, warn=lambda m: say(f"warning: {m}"))
    if latest is None:
        raise ValueError(f"{uri}: neither a checkpoint folder nor a run folder holding a complete checkpoint")
    return fs, latest


def load_checkpoint_bytes(uri: str, endpoint_url: Optional[str] = None) -> tuple[bytes, str]:
    fs, folder = find_checkpoint(uri, endpoint_url)
    problem = checkpoint.verify(fs, folder)
    if problem:
        raise ValueError(f"checkpoint {uri} is not usable: {problem}")
    return fs.cat_file(f"{folder}/{checkpoint.STATE}"), folder


def model_from_bytes(state_bytes: bytes) -> tuple[VAE, dict]:
    saved = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=False)
    cfg = config_from_dict(saved["config"])
    vae = VAE.from_config(cfg.model)
    vae.load_state_dict(saved["model"])
    return vae, saved


def _chunks(num_units: int, num_workers: int) -> list[list[int]]:
    """Several chunks per worker, so the work balances and progress moves."""
    num_chunks = min(num_units, max(1, num_workers) * 4)
    return [c.tolist() for c in np.array_split(np.arange(num_units), num_chunks) if len(c)]


def _evaluate_task(state_bytes, data_uri, endpoint_url, unit_ids, options, threads) -> Sums:
    torch.set_num_threads(threads)
    vae, _ = model_from_bytes(state_bytes)
    dataset = ParquetDataset(data_uri, expected_dim=vae.input_dim, endpoint_url=endpoint_url)
    return evaluate_units(vae, dataset, unit_ids, **options)


def _open(data_uri: str, vae: VAE, endpoint_url: Optional[str]) -> ParquetDataset:
    return ParquetDataset(data_uri, expected_dim=vae.input_dim, endpoint_url=endpoint_url)


def _workers_and_threads(num_workers: int) -> tuple[float, int]:
    cpus = max(cluster_cpus() / num_workers, 0.01)
    return cpus, max(1, math.floor(cpus + 1e-6))


def evaluate(checkpoint_uri: str, data_uri: str, *, num_importance_samples: int = 5000, num_workers: int = 2,
             batch_size: int = 100, chunk_size: int = 100, seed: int = 0, output_uri: Optional[str] = None,
             endpoint_url: Optional[str] = None, ray_address: Optional[str] = None, estimator: str = "is",
             num_steps: int = 500, num_leapfrog: int = 10) -> dict:
    if num_importance_samples < 1:
        raise ValueError(f"--num-importance-samples={num_importance_samples} must be at least 1 "
                         "(log p(x) is estimated from K >= 1 importance samples; 5000 is the literature's choice)")
    if num_workers < 1:
        raise ValueError(f"--num-workers={num_workers} must be at least 1")
    if estimator not in ML_ESTIMATORS:
        raise ValueError(f"--estimator={estimator!r} is not one of: {', '.join(ML_ESTIMATORS)}")
    if estimator != "is" and (num_steps < 3 or num_leapfrog < 1):
        raise ValueError(f"--num-steps={num_steps} must be at least 3 and --leapfrog-steps={num_leapfrog} at least 1")
    data_uri = absolute(data_uri)
    state_bytes, folder = load_checkpoint_bytes(checkpoint_uri, endpoint_url)
    vae, saved = model_from_bytes(state_bytes)
    train_binarization = saved["config"]["data"]["binarization"]
    dataset = _open(data_uri, vae, endpoint_url)
    if estimator == "is" and vae.posterior.support != "real":
        say(f"warning: q(z|x) is {vae.posterior.name}, supported on the {vae.posterior.support} values only, while "
            "p(z|x) covers the real line: importance sampling then estimates a lower bound on log p(x), not log "
            "p(x) itself; use --estimator ais")
    options = dict(num_importance_samples=num_importance_samples, chunk_size=chunk_size, batch_size=batch_size,
                   binarization=eval_binarization(vae.likelihood.name, train_binarization), seed=seed,
                   estimator=estimator, num_steps=num_steps, num_leapfrog=num_leapfrog)
    chunks = _chunks(len(dataset.units), num_workers)
    started = start_ray(ray_address)
    total = Sums()
    try:
        import ray

        cpus, threads = _workers_and_threads(num_workers)
        state_ref = ray.put(state_bytes)
        progress = Progress(f"evaluate ({estimator}, K={num_importance_samples})", dataset.num_rows)

        def done(i: int, sums: Sums) -> None:
            nonlocal total
            total = total + sums
            progress.add(sums.count)

        run_tasks(_evaluate_task, [(state_ref, data_uri, endpoint_url, c, options, threads) for c in chunks],
                  max_in_flight=num_workers, num_cpus=cpus, on_done=done)
    finally:
        stop_ray(started)
    if total.count != dataset.num_rows:
        raise RuntimeError(f"evaluated {total.count} examples of {dataset.num_rows}; refusing a partial result")
    result = {**total.summary(), "estimator": estimator, "num_importance_samples": num_importance_samples,
              **({} if estimator == "is" else {"num_steps": num_steps, "num_leapfrog": num_leapfrog}),
              "checkpoint": folder,
              "step": saved["state"]["step"], "data": data_uri, "binarization": options["binarization"],
              "seed": seed}
    if output_uri:
        fs, path = storage.resolve(output_uri, endpoint_url)
        fs.pipe_file(path, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _encode_task(state_bytes, data_uri, endpoint_url, unit_ids, options, threads, staging_uri, part) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    torch.set_num_threads(threads)
    vae, _ = model_from_bytes(state_bytes)
    out = encode_units(vae, _open(data_uri, vae, endpoint_url), unit_ids, **options)
    columns = {"index": pa.array(out["index"])}
    if "label" in out:
        columns["label"] = pa.array(out["label"])
    for key in ("mean", "std"):
        columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(out[key].reshape(-1)), vae.latent_dim)
    table = pa.table(columns).replace_schema_metadata({b"aevb.latent_dim": str(vae.latent_dim).encode()})
    fs, path = storage.resolve(staging_uri, endpoint_url)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/part-{part:05d}.parquet", "wb") as f:
        pq.write_table(table, f)
    return len(out["index"])


def encode(checkpoint_uri: str, data_uri: str, output_uri: str, *, num_workers: int = 2, seed: int = 0,
           overwrite: bool = False, endpoint_url: Optional[str] = None, ray_address: Optional[str] = None) -> int:
    """Write q_φ(z|x) for every example as sharded Parquet; returns the number of rows written."""
    if storage.scheme_of(output_uri) == "memory":
        raise ValueError("OUTPUT_URI=memory://... is private to one process; Ray tasks cannot write there")
    data_uri, output_uri = absolute(data_uri), absolute(output_uri)
    state_bytes, _ = load_checkpoint_bytes(checkpoint_uri, endpoint_url)
    vae, saved = model_from_bytes(state_bytes)
    dataset = _open(data_uri, vae, endpoint_url)
    fs, root = storage.resolve(output_uri, endpoint_url)
    if fs.exists(root) and fs.ls(root) and not overwrite:
        raise ValueError(f"{output_uri} is not empty; pass --overwrite to replace it")
    staging_path = f"{root.rstrip('/')}.incomplete-{uuid.uuid4().hex[:8]}"
    staging_uri = staging_path if storage.scheme_of(output_uri) == "file" else \
        f"{storage.scheme_of(output_uri)}://{staging_path}"
    options = dict(binarization=eval_binarization(vae.likelihood.name, saved["config"]["data"]["binarization"]),
                   seed=seed)
    chunks = _chunks(len(dataset.units), num_workers)
    started = start_ray(ray_address)
    written = 0
    try:
        import ray

        cpus, threads = _workers_and_threads(num_workers)
        state_ref = ray.put(state_bytes)
        progress = Progress("encode", dataset.num_rows)

        def done(i: int, rows: int) -> None:
            nonlocal written
            written += rows
            progress.add(rows)

        run_tasks(_encode_task, [(state_ref, data_uri, endpoint_url, c, options, threads, staging_uri, i)
                                 for i, c in enumerate(chunks)],
                  max_in_flight=num_workers, num_cpus=cpus, on_done=done)
        if written != dataset.num_rows:
            raise RuntimeError(f"encoded {written} examples of {dataset.num_rows}; refusing a partial result")
        if fs.exists(root):
            fs.rm(root, recursive=True)
        storage.move_tree(fs, staging_path, root)
    finally:
        stop_ray(started)
        if fs.exists(staging_path):
            fs.rm(staging_path, recursive=True)
    return written
