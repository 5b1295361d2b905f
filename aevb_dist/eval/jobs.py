"""`aevb-dist evaluate` and `aevb-dist encode`: the paper's other two aims at dataset scale.

The driver deals chunks of row groups to Ray tasks (at most `num_workers` at once), each
task computes sums (evaluate) or writes one Parquet part (encode), and the driver adds
the sums and divides once. Every row group is computed exactly once.
"""

from __future__ import annotations

import json
import math
from typing import Optional

import numpy as np
import torch

from aevb_dist import names
from aevb_dist.cluster.ray_runtime import cluster_cpus, run_tasks, start_ray, stop_ray, threads_for_cpus
from aevb_dist.console import Progress, first_line, say
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.eval.evaluation import Sums, encode_units, evaluate_units, open_as_trained
from aevb_dist.eval.saved_model import model_from_bytes, saved_eval_binarization
from aevb_dist.run import storage
from aevb_dist.run.checkpoint import load_checkpoint_bytes
from aevb_dist.run.uri import absolute_uri, join


def _chunks(num_units: int, num_workers: int) -> list[list[int]]:
    """Several chunks per worker, so the work balances and progress moves."""
    num_chunks = min(num_units, max(1, num_workers) * 4)
    return [c.tolist() for c in np.array_split(np.arange(num_units), num_chunks) if len(c)]


def _reopen(data_uri: str, endpoint_url: Optional[str], description: dict) -> ParquetDataset:
    """The driver's dataset in a task, from its description: no storage request to open it."""
    return ParquetDataset(data_uri, endpoint_url=endpoint_url, description=description)


def _evaluate_task(state_bytes, data_uri, endpoint_url, description, unit_ids, options, use_gpu, threads) -> Sums:
    torch.set_num_threads(threads)
    vae, _ = model_from_bytes(state_bytes, architecture_checked=True)  # on the driver, before the tasks
    vae = vae.to("cuda") if use_gpu else vae  # Ray made the task's GPU the only one it sees
    return evaluate_units(vae, _reopen(data_uri, endpoint_url, description), unit_ids, **options)


def _run_chunks(
    task,
    state_bytes: bytes,
    chunk_args: list[tuple],
    *,
    num_workers: int,
    ray_address: Optional[str],
    on_done,
    use_gpu: bool = False,
) -> None:
    """`task(state, *args, threads)` per chunk on Ray tasks, `num_workers` at once, each holding an equal
    share of the cluster's CPUs (and with `use_gpu` a GPU); the checkpoint's bytes go to the object store once."""
    started = start_ray(ray_address)
    try:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
        if use_gpu and gpus < 1:
            raise ValueError(
                "--use-gpu: the Ray cluster has no GPU (ray.cluster_resources() lists none); "
                "drop --use-gpu or join a cluster with GPUs (--ray-address)"
            )
        cpus = max(cluster_cpus() / num_workers, 0.01)
        state_ref = ray.put(state_bytes)
        run_tasks(
            task,
            [(state_ref, *args, threads_for_cpus(cpus)) for args in chunk_args],
            max_in_flight=num_workers,
            num_cpus=cpus,
            num_gpus=1 if use_gpu else 0,
            on_done=on_done,
        )
    finally:
        stop_ray(started)


def _check_evaluate_args(
    num_importance_samples: int, num_workers: int, estimator: str, num_steps: int, num_leapfrog: int
) -> None:
    if num_importance_samples < 1:
        raise ValueError(
            f"--num-importance-samples={num_importance_samples} must be at least 1 "
            "(log p(x) is estimated from K >= 1 importance samples; 5000 is the literature's choice)"
        )
    if num_workers < 1:
        raise ValueError(f"--num-workers={num_workers} must be at least 1")
    if estimator not in names.MARGINAL_LIKELIHOOD_ESTIMATORS:
        raise ValueError(f"--estimator={estimator!r} is not one of: {', '.join(names.MARGINAL_LIKELIHOOD_ESTIMATORS)}")
    if estimator != "is" and (num_steps < 3 or num_leapfrog < 1):
        raise ValueError(f"--num-steps={num_steps} must be at least 3 and --leapfrog-steps={num_leapfrog} at least 1")


def evaluate(
    checkpoint_uri: str,
    data_uri: str,
    *,
    num_importance_samples: int = 5000,
    num_workers: int = 2,
    batch_size: int = names.EVAL_BATCH_SIZE,
    chunk_size: int = 100,
    seed: int = 0,
    output_uri: Optional[str] = None,
    endpoint_url: Optional[str] = None,
    ray_address: Optional[str] = None,
    estimator: str = "is",
    num_steps: int = 500,
    num_leapfrog: int = 10,
    use_gpu: bool = False,
    save_in_run_folder: bool = False,
) -> dict:
    """Dataset means (and standard errors) of the ELBO and log p(x), every row group computed once; with
    `use_gpu` each Ray task holds one of the cluster's GPUs (the noise then comes from the GPU's generator).
    The result is also written to `output_uri` where given, and into the checkpoint's run folder
    (`evaluation_file_name`) with `save_in_run_folder`, as `aevb-dist evaluate` does."""
    _check_evaluate_args(num_importance_samples, num_workers, estimator, num_steps, num_leapfrog)
    data_uri = absolute_uri(data_uri)
    state_bytes, folder = load_checkpoint_bytes(checkpoint_uri, endpoint_url)
    vae, saved = model_from_bytes(state_bytes, folder)
    dataset = open_as_trained(data_uri, vae, saved, endpoint_url)
    dataset.check_fits_likelihood(vae.likelihood.name, data_uri)
    if estimator == "is" and vae.posterior.support != "real":
        say(
            f"warning: q(z|x) is {vae.posterior.name}, supported on the {vae.posterior.support} values only, while "
            "p(z|x) covers the real line: importance sampling then estimates a lower bound on log p(x), not log "
            "p(x) itself; use --estimator ais"
        )
    options = dict(
        num_importance_samples=num_importance_samples,
        chunk_size=chunk_size,
        batch_size=batch_size,
        binarization=saved_eval_binarization(vae, saved),
        seed=seed,
        estimator=estimator,
        num_steps=num_steps,
        num_leapfrog=num_leapfrog,
    )
    progress = Progress(f"evaluate ({estimator}, K={num_importance_samples})", dataset.num_rows)
    total = Sums()

    def done(i: int, sums: Sums) -> None:
        nonlocal total
        total = total + sums
        progress.add(sums.count)

    description = dataset.describe()
    _run_chunks(
        _evaluate_task,
        state_bytes,
        [(data_uri, endpoint_url, description, c, options, use_gpu) for c in _chunks(len(dataset.units), num_workers)],
        num_workers=num_workers,
        ray_address=ray_address,
        on_done=done,
        use_gpu=use_gpu,
    )
    if total.count != dataset.num_rows:
        raise RuntimeError(f"evaluated {total.count} examples of {dataset.num_rows}; refusing a partial result")
    result = {
        **total.summary(),
        "estimator": estimator,
        "num_importance_samples": num_importance_samples,
        **({} if estimator == "is" else {"num_steps": num_steps, "num_leapfrog": num_leapfrog}),
        "checkpoint": folder,
        "step": saved["state"]["step"],
        "data": data_uri,
        "binarization": options["binarization"],
        "seed": seed,
    }
    result.update(_for_this_model(vae, total, result))
    _keep(result, output_uri, endpoint_url, checkpoint_uri if save_in_run_folder else None, folder)
    return result


def _keep(result: dict, output_uri: Optional[str], endpoint_url: Optional[str], run_of: Optional[str], folder: str):
    """The evaluation's JSON at `output_uri`, and in the run folder of `run_of` (whose checkpoint is `folder`)."""
    text = (json.dumps(result, indent=2) + "\n").encode()
    if output_uri:
        fs, path = storage.resolve(output_uri, endpoint_url)
        fs.pipe_file(path, text)
    if run_of is not None:
        _save_in_run_folder(text, run_of, folder, result["data"], result["estimator"], endpoint_url)


def evaluation_file_name(data_uri: str, estimator: str) -> str:
    """Where an evaluation is kept in its run folder: one file per split and estimator (eval_test.json for
    importance sampling on a split named test), the newest evaluation of each."""
    split = data_uri.rstrip("/").rsplit("/", 1)[-1] or "data"
    return f"eval_{split}.json" if estimator == "is" else f"eval_{split}_{estimator}.json"


def _save_in_run_folder(
    text: bytes, checkpoint_uri: str, folder: str, data_uri: str, estimator: str, endpoint_url: Optional[str]
) -> None:
    """The evaluation beside the model it scored. A run folder this user may read but not write keeps the
    result printed only, with a warning: the evaluation itself succeeded."""
    fs, given = storage.resolve(checkpoint_uri, endpoint_url)
    run_uri = checkpoint_uri.rstrip("/")
    if folder.rstrip("/") == given.rstrip("/"):  # a checkpoint folder was named: its run folder holds it
        run_uri = run_uri.rsplit("/", 1)[0]
    target = join(run_uri, evaluation_file_name(data_uri, estimator))
    try:
        fs.pipe_file(storage.resolve(target, endpoint_url)[1], text)
    except Exception as err:  # noqa: BLE001 - a read-only bucket or folder: told, and the result stands
        say(f"warning: could not keep the evaluation in {target} ({type(err).__name__}: {first_line(err)})")
        return
    say(f"wrote {target}")


def _for_this_model(vae, total: Sums, result: dict) -> dict:
    """What only some models report: each stochastic layer's active units, bits per pixel, how well the latents
    of labelled cells cluster by label."""
    extra = clustering_scores(total.labelled_means, total.labels, seed=result["seed"])
    if len(vae.latent_dims) > 1:
        extra["active_units_per_layer"] = total.active_units_by_layer(vae.latent_dims)
    if vae.likelihood.name == "discretized_logistic":  # a probability mass over 256 levels: bits per pixel
        for key in ("elbo", "log_marginal_likelihood"):
            if key in result:
                extra[f"{key}_bits_per_dim"] = -result[key] / (vae.input_dim * math.log(2.0))
    return extra


MAX_CLUSTERED_CELLS = 50_000  # k-means on a seeded sample of at most this many cells


def clustering_scores(means_NZ: Optional[np.ndarray], labels_N: Optional[np.ndarray], *, seed: int) -> dict:
    """The adjusted Rand index and normalized mutual information of k-means (k: the labels' count) on the cells'
    posterior means against their labels (scVI's benchmarks' scores); {} without labelled cells."""
    if means_NZ is None or len(np.unique(labels_N)) < 2:
        return {}
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if len(labels_N) > MAX_CLUSTERED_CELLS:
        kept = np.sort(np.random.default_rng(seed).choice(len(labels_N), MAX_CLUSTERED_CELLS, replace=False))
        means_NZ, labels_N = means_NZ[kept], labels_N[kept]
    k = len(np.unique(labels_N))
    clusters = KMeans(k, n_init=10, random_state=seed).fit_predict(means_NZ)
    return {
        "kmeans_ari": float(adjusted_rand_score(labels_N, clusters)),
        "kmeans_nmi": float(normalized_mutual_info_score(labels_N, clusters)),
        "kmeans_num_cells": int(len(labels_N)),
    }


def _encode_task(
    state_bytes, data_uri, endpoint_url, description, unit_ids, options, staging_uri, part, threads
) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    torch.set_num_threads(threads)
    vae, _ = model_from_bytes(state_bytes, architecture_checked=True)  # on the driver, before the tasks
    dataset = _reopen(data_uri, endpoint_url, description)
    out = encode_units(vae, dataset, unit_ids, **options)
    columns = {"index": pa.array(out["index"])}
    if "label" in out:
        columns["label"] = pa.array(out["label"])
    for i, name in enumerate(dataset.covariate_columns if "covariates" in out else []):
        columns[name] = pa.array(out["covariates"][:, i])  # codes into the data's categories, as `prepare` wrote
    for key in ("mean", "std"):
        columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(out[key].reshape(-1)), vae.latent_dim)
    table = pa.table(columns).replace_schema_metadata({b"aevb.latent_dim": str(vae.latent_dim).encode()})
    fs, path = storage.resolve(staging_uri, endpoint_url)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/part-{part:05d}.parquet", "wb") as f:
        pq.write_table(table, f)
    return len(out["index"])


def encode(
    checkpoint_uri: str,
    data_uri: str,
    output_uri: str,
    *,
    num_workers: int = 2,
    seed: int = 0,
    overwrite: bool = False,
    endpoint_url: Optional[str] = None,
    ray_address: Optional[str] = None,
) -> int:
    """Write q_φ(z|x) for every example as sharded Parquet; returns the number of rows written."""
    if storage.scheme_of(output_uri) == "memory":
        raise ValueError("OUTPUT_URI=memory://... is private to one process; Ray tasks cannot write there")
    data_uri, output_uri = absolute_uri(data_uri), absolute_uri(output_uri)
    state_bytes, folder = load_checkpoint_bytes(checkpoint_uri, endpoint_url)
    vae, saved = model_from_bytes(state_bytes, folder)
    dataset = open_as_trained(data_uri, vae, saved, endpoint_url)
    fs, root = storage.resolve(output_uri, endpoint_url)
    if fs.exists(root) and fs.ls(root) and not overwrite:
        raise ValueError(f"{output_uri} is not empty; pass --overwrite to replace it")
    options = dict(binarization=saved_eval_binarization(vae, saved), seed=seed)
    progress = Progress("encode", dataset.num_rows)
    written = 0

    def done(i: int, rows: int) -> None:
        nonlocal written
        written += rows
        progress.add(rows)

    with storage.replace_folder(fs, root) as staging:
        scheme = storage.scheme_of(output_uri)
        staging_uri = staging if scheme == "file" else f"{scheme}://{staging}"
        description = dataset.describe()
        _run_chunks(
            _encode_task,
            state_bytes,
            [
                (data_uri, endpoint_url, description, c, options, staging_uri, i)
                for i, c in enumerate(_chunks(len(dataset.units), num_workers))
            ],
            num_workers=num_workers,
            ray_address=ray_address,
            on_done=done,
        )
        if written != dataset.num_rows:
            raise RuntimeError(f"encoded {written} examples of {dataset.num_rows}; refusing a partial result")
    return written
