"""aevb-dist on single-cell counts against scvi-tools and a hand-written loop, the three alternated.

    python benchmarks/single_cell.py --scvi-python SCVI_VENV/bin/python [--cells 50000] [--genes 2000]
        [--epochs 5] [--rounds 2]

scvi-tools lives in a venv of its own, with the same torch:
    python -m venv scvi-venv && scvi-venv/bin/pip install torch==2.13.0 && scvi-venv/bin/pip install scvi-tools==1.4.2

The data: a seeded synthetic atlas (tests/atlas.py: negative-binomial counts from 8 planted cell types and 2
batches with gene-wise batch effects) of --cells × --genes, written as an .h5ad with raw counts in
layers["counts"] and converted once by `aevb-dist prepare` (the cells split 90/10 by its seeded
--test-fraction); scvi-tools and the hand-written loop train on the same training cells and are scored on the
same test cells.

The model, for all three: scVI's (one hidden layer of 128 units, 10 latents, a negative binomial with one
inverse dispersion per gene, the mean the observed library size × softmax), conditioned on the batch in the
encoder and the decoder, Adam 1e-3, batches of 128, --epochs epochs. scvi-tools runs with its defaults
otherwise (batch norm and dropout 0.1 in its networks) except two settings that make it optimize the same
objective as the others: `encode_covariates=True` (its encoder sees the batch, as ours does) and
`n_epochs_kl_warmup=None` (its default anneals the KL's weight from 0 over 400 epochs, so 5 epochs would
optimize a different bound).

Printed per round and as medians over rounds:
- steady cells/s: the epochs after the first (scvi-tools: a Lightning callback's epoch ends; aevb-dist:
  metrics.csv's samples and times from the first row of epoch 1 to the last; the loop: its epoch ends);
- the whole command: `aevb-dist train` from start to exit, against scvi-tools' script from its first line
  (before its imports) to the trained model;
- the test cells' ELBO per cell (one sample of z, the KL in closed form, for both) and the adjusted Rand
  index of k-means (k = 8) on their posterior means against the planted types.
Ratios: aevb-dist's cells/s over scvi-tools' and over the loop's, each paired within a round.
Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests import atlas as atlases  # noqa: E402

NUM_TYPES, NUM_BATCHES = 8, 2

SCVI_SCRIPT = r"""
import time
started = time.time()
import json, sys
import numpy as np, anndata, scvi, torch
from lightning.pytorch.callbacks import Callback
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

args = json.loads(sys.argv[1])
adata = anndata.read_h5ad(args["h5ad"])
train, test = adata[np.load(args["train"])].copy(), adata[np.load(args["test"])].copy()
scvi.model.SCVI.setup_anndata(train, layer="counts", batch_key="donor")
model = scvi.model.SCVI(
    train, n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="nb", dispersion="gene", encode_covariates=True
)

class EpochEnds(Callback):
    def __init__(self):
        self.ends = []

    def on_train_epoch_end(self, trainer, module):
        self.ends.append(time.time())

ends = EpochEnds()
scvi.settings.seed = 0
model.train(
    max_epochs=args["epochs"], batch_size=128, train_size=1.0, accelerator="cpu", enable_progress_bar=False,
    plan_kwargs={"n_epochs_kl_warmup": None, "lr": 1e-3}, callbacks=[ends],
)
trained = time.time()
steady = (len(ends.ends) - 1) * train.n_obs / (ends.ends[-1] - ends.ends[0])
elbo = float(model.get_elbo(test))
latent = model.get_latent_representation(test)
clusters = KMeans(args["k"], n_init=10, random_state=0).fit_predict(latent)
print(json.dumps({
    "cells_per_s": steady, "import_to_trained_s": trained - started, "test_elbo": elbo,
    "kmeans_ari": adjusted_rand_score(test.obs["cell_type"], clusters), "threads": torch.get_num_threads(),
}))
"""


def make_data(folder: str, cells: int, genes: int) -> dict:
    atlas = atlases.synthetic_atlas(
        num_cells=cells, num_genes=genes, num_types=NUM_TYPES, num_batches=NUM_BATCHES, seed=0, mean_library=2000
    )
    h5ad = atlases.write_h5ad(atlas, f"{folder}/atlas.h5ad")
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "aevb_dist",
            "prepare",
            h5ad,
            f"{folder}/data",
            "--layer",
            "counts",
            "--batch-key",
            "donor",
            "--labels-key",
            "cell_type",
            "--num-shards",
            "8",
        ],
        check=True,
        capture_output=True,
    )
    prepare_s = time.perf_counter() - started
    test = np.sort(pq.read_table(f"{folder}/data/test", columns=["index"]).column("index").to_numpy())
    train = np.setdiff1d(np.arange(cells), test)
    np.save(f"{folder}/train.npy", train)
    np.save(f"{folder}/test.npy", test)
    from scipy import sparse

    sparse.save_npz(f"{folder}/train.npz", atlas.counts[train])
    np.save(f"{folder}/train_batch.npy", np.array([int(b.rsplit("_", 1)[1]) for b in atlas.batch[train]]))
    nnz = atlas.counts.nnz / (cells * genes)
    return {"h5ad": h5ad, "prepare_s": prepare_s, "num_train": len(train), "num_test": len(test), "density": nnz}


def run_scvi(python: str, folder: str, epochs: int) -> dict:
    args = {
        "h5ad": f"{folder}/atlas.h5ad",
        "train": f"{folder}/train.npy",
        "test": f"{folder}/test.npy",
        "epochs": epochs,
        "k": NUM_TYPES,
    }
    done = subprocess.run([python, "-c", SCVI_SCRIPT, json.dumps(args)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_plain(folder: str, epochs: int) -> dict:
    script = os.path.join(REPO, "benchmarks", "plain_cells.py")
    args = [f"{folder}/train.npz", f"{folder}/train_batch.npy", str(NUM_BATCHES), str(epochs)]
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _command(*args: str) -> tuple[str, float]:
    """`aevb-dist ARGS`: its stdout and wall seconds; its stderr's tail in the error where it fails."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aevb_dist", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"aevb-dist {args[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - started


def run_ours(folder: str, genes: int, epochs: int, name: str, local_mode: bool) -> dict:
    overrides = [
        f"data.train_uri={folder}/data/train",
        "data.test_uri=null",  # training timed alone; the test cells are scored by `evaluate` after it
        f"model.input_dim={genes}",
        "model.covariates=[batch]",
        f"train.num_epochs={epochs}",
        f"run.storage_uri={folder}/runs",
        f"run.name={name}",
        "train.log_every_steps=50",
        "checkpoint.every_steps=1000000",
        f"ray.local_mode={str(local_mode).lower()}",
    ]
    _, command_s = _command("train", os.path.join(REPO, "configs/single_cell_nb.yaml"), *overrides)
    with open(f"{folder}/runs/{name}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    first = next(r for r in rows if int(r["epoch"]) >= 1)
    steady = (float(rows[-1]["samples_seen"]) - float(first["samples_seen"])) / (
        float(rows[-1]["time"]) - float(first["time"])
    )
    scored, _ = _command("evaluate", f"{folder}/runs/{name}", f"{folder}/data/test", "-k", "1", "--num-workers", "1")
    result = json.loads(scored)
    return {
        "cells_per_s": steady,
        "command_s": command_s,
        "test_elbo": result["elbo"],
        "kmeans_ari": result["kmeans_ari"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scvi-python", required=True)
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(
        f"commit {commit.stdout.strip()}, {os.cpu_count()} cores, {args.cells:,} cells × {args.genes:,} genes, "
        f"{args.epochs} epochs, {args.rounds} rounds",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="aevb-sc-bench-") as folder:
        data = make_data(folder, args.cells, args.genes)
        print(
            f"data: {data['num_train']:,} train / {data['num_test']:,} test cells, density {data['density']:.3f}, "
            f"prepare {data['prepare_s']:.1f} s",
            flush=True,
        )
        cases = {
            "scvi-tools": lambda r: run_scvi(args.scvi_python, folder, args.epochs),
            "plain loop": lambda r: run_plain(folder, args.epochs),
            "aevb-dist local mode": lambda r: run_ours(folder, args.genes, args.epochs, f"local{r}", True),
            "aevb-dist embedded Ray": lambda r: run_ours(folder, args.genes, args.epochs, f"ray{r}", False),
        }
        results: dict[str, list[dict]] = {name: [] for name in cases}
        for r in range(args.rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for name in order:
                results[name].append(cases[name](r))
                print(f"round {r + 1} {name}: {json.dumps(results[name][-1])}", flush=True)
        report(results)


def report(results: dict[str, list[dict]]) -> None:
    def median(name, key):
        return statistics.median(r[key] for r in results[name])

    print("\nmedians over rounds:")
    for name, runs in results.items():
        keys = [
            k for k in ("cells_per_s", "command_s", "import_to_trained_s", "test_elbo", "kmeans_ari") if k in runs[0]
        ]
        print(f"  {name}: " + ", ".join(f"{k} {median(name, k):.4g}" for k in keys))
    for ours in ("aevb-dist local mode", "aevb-dist embedded Ray"):
        for other in ("scvi-tools", "plain loop"):
            ratios = [a["cells_per_s"] / b["cells_per_s"] for a, b in zip(results[ours], results[other])]
            rounds = [round(x, 3) for x in ratios]
            print(f"  {ours} / {other} cells/s: median {statistics.median(ratios):.3f} (rounds {rounds})")
    scvi = results["scvi-tools"]
    for ours in ("aevb-dist local mode", "aevb-dist embedded Ray"):
        elbo = statistics.median(a["test_elbo"] / b["test_elbo"] for a, b in zip(results[ours], scvi))
        ari = statistics.median(a["kmeans_ari"] - b["kmeans_ari"] for a, b in zip(results[ours], scvi))
        command = statistics.median(a["command_s"] / b["import_to_trained_s"] for a, b in zip(results[ours], scvi))
        print(
            f"  {ours} vs scvi-tools: test ELBO ratio {elbo:.4f} (below 1: ours higher), "
            f"ARI difference {ari:+.3f}, whole command / scvi-tools' import-to-trained {command:.3f}"
        )


if __name__ == "__main__":
    main()
