"""`aevb-dist quickstart`: the whole pipeline on data that ships with an installed package.

scikit-learn's 8×8 handwritten digits (1,797 images, `sklearn.datasets.load_digits`), or
Debian's Fashion-MNIST where installed, become sharded Parquet; a 2-latent VAE trains with
2 data-parallel workers on the embedded Ray; the test ELBO and log p(x) are evaluated; the
learning curve, samples and the 2-D manifold are plotted.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from aevb_dist.cluster.ray_runtime import start_ray, stop_ray
from aevb_dist.config import load_config
from aevb_dist.console import say
from aevb_dist.data.prepare import prepare

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# Per dataset: model and training overrides sized to finish in about a minute on 2 CPU cores,
# and the importance samples K for the test log p(x) (Fashion-MNIST has 10,000 test images).
IMPORTANCE_SAMPLES = {"digits": 1000, "fashion-mnist": 100}
SETTINGS = {
    "digits": [
        "model.input_dim=64",
        "model.hidden_sizes=[128]",
        "train.num_epochs=40",
        "train.batch_size_per_worker=25",
        "train.log_every_steps=50",
        "train.eval_every_steps=400",
        "checkpoint.every_steps=400",
        "optim.lr=0.003",
    ],
    "fashion-mnist": [
        "model.input_dim=784",
        "model.hidden_sizes=[256]",
        "train.num_epochs=2",
        "train.batch_size_per_worker=50",
        "train.log_every_steps=100",
        "train.eval_every_steps=600",
        "checkpoint.every_steps=600",
        "optim.lr=0.001",
    ],
}


def _prepare_source(dataset: str, data_uri: str) -> None:
    if os.path.exists(data_uri):
        say(f"using the dataset already at {data_uri}")
        return
    if dataset == "fashion-mnist":
        if not os.path.isdir(FASHION_MNIST):
            raise ValueError(
                f"{FASHION_MNIST} does not exist: `apt-get install dataset-fashion-mnist`, or use --dataset digits"
            )
        prepare(FASHION_MNIST, data_uri, fmt="fashion-mnist", num_shards=4)
        return
    from sklearn.datasets import load_digits

    digits = load_digits()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits.npz")
        np.savez(path, x=digits.images.astype(np.float32), y=digits.target.astype(np.int64))
        prepare(path, data_uri, fmt="npy", num_shards=4, rows_per_row_group=100, test_fraction=0.1)


def quickstart(output: str = "aevb-quickstart", dataset: str = "digits") -> dict:
    if dataset not in SETTINGS:
        raise ValueError(f"--dataset={dataset!r} is not one of: {', '.join(SETTINGS)}")
    from aevb_dist.eval.jobs import evaluate
    from aevb_dist.eval.plotting import plot_run
    from aevb_dist.train.driver import train

    start = time.perf_counter()
    output = os.path.abspath(output)
    data_uri = os.path.join(output, "data", dataset)
    run_dir = os.path.join(output, "runs", f"quickstart_{dataset.replace('-', '_')}")
    _prepare_source(dataset, data_uri)
    overrides = SETTINGS[dataset] + [
        f"data.train_uri={data_uri}/train",
        f"data.test_uri={data_uri}/test",
        "model.latent_dim=2",
        "model.likelihood=bernoulli",
        "data.binarization=dynamic",
        "train.num_workers=2",
        "optim.name=adam",
        f"run.storage_uri={os.path.dirname(run_dir)}",
        f"run.name={os.path.basename(run_dir)}",
    ]
    cfg = load_config(None, overrides)
    started = start_ray(None)  # one embedded Ray for training and evaluation
    try:
        train(cfg)
        result = evaluate(
            run_dir,
            f"{data_uri}/test",
            num_importance_samples=IMPORTANCE_SAMPLES[dataset],
            num_workers=2,
            save_in_run_folder=True,  # eval_test.json
        )
    finally:
        stop_ray(started)
    plots = plot_run(run_dir)
    _print_summary(output, run_dir, data_uri, result, plots, time.perf_counter() - start)
    return {"run_dir": run_dir, "data_uri": data_uri, "evaluation": result, "plots": plots}


def _print_summary(output, run_dir, data_uri, result, plots, seconds) -> None:
    elbo = f"ELBO {result['elbo']:.2f} ± {result['elbo_sem']:.2f}"
    log_px = f"log p(x) {result['log_marginal_likelihood']:.2f} ± {result['log_marginal_likelihood_sem']:.2f}"
    print(
        f"""
aevb-dist quickstart finished in {seconds:.0f} s. Everything is under {output}:
  dataset (sharded Parquet)   {data_uri}/{{train,test}}
  run folder                  {run_dir}  (metrics.csv, tensorboard/, config.yaml, checkpoint_*/)
  test set                    {elbo}, {log_px} (K={result["num_importance_samples"]}), {result["num_examples"]} examples
                              (all of it in {run_dir}/eval_test.json)
  plots                       {", ".join(os.path.basename(p) for p in plots)} in {os.path.dirname(plots[0])}

Next:
  resume and train longer:    aevb-dist train {run_dir}/config.yaml train.num_epochs=100
  evaluate with K=5000:       aevb-dist evaluate {run_dir} {data_uri}/test -k 5000
  posterior codes q(z|x):     aevb-dist encode {run_dir} {data_uri}/test {output}/codes
  the paper's MNIST model:    aevb-dist prepare MNIST_DIR data/mnist && aevb-dist train configs/mnist.yaml
                              (MNIST_DIR: a folder holding MNIST's four IDX .gz files)
  on a cluster:               aevb-dist train configs/mnist.yaml ray.address=auto run.storage_uri=s3://bucket/runs
""".rstrip()
    )
