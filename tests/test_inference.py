"""evaluate, encode, plot and variance on a model trained here with `aevb-dist train`'s code."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.data.binarization import binarize
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.eval.evaluation import evaluate_units
from aevb_dist.eval.jobs import encode, evaluate
from aevb_dist.eval.plotting import gradient_variance_figure, plot_run, write_figure
from aevb_dist.eval.saved_model import model_from_bytes
from aevb_dist.model.elbo import sgvb_b
from aevb_dist.model.gradient_variance import variance_report, variance_sweep
from aevb_dist.model.marginal_likelihood import log_marginal_likelihood
from aevb_dist.run.checkpoint import load_checkpoint_bytes
from aevb_dist.train.driver import train
from tests.helpers import SMOKE, read_all, tiny_overrides

pytestmark = pytest.mark.slow  # a model trained on a real local Ray, then Ray tasks


@pytest.fixture(scope="module")
def trained(ray_local, tiny_data, tmp_path_factory):
    """A 2-latent Bernoulli model on the tiny data (intensities binarized), trained for a few epochs in local mode
    (how it was trained is not under test here; the evaluations below are Ray tasks on `ray_local`)."""
    runs = tmp_path_factory.mktemp("runs")
    overrides = {"train.num_workers": 2, "train.max_steps": 60, "checkpoint.every_steps": 30, "ray.local_mode": "true"}
    cfg = load_config(SMOKE, tiny_overrides(tiny_data, str(runs), **overrides))
    train(cfg)
    return {"run": f"{runs}/smoke", "test": f"{tiny_data}/test", "train": f"{tiny_data}/train"}


def test_evaluate_matches_single_process_and_worker_count(trained):
    one = evaluate(trained["run"], trained["test"], num_importance_samples=200, num_workers=1, seed=3)
    two = evaluate(trained["run"], trained["test"], num_importance_samples=200, num_workers=2, seed=3)
    assert one["num_examples"] == two["num_examples"] == 30
    assert two["log_marginal_likelihood"] == pytest.approx(one["log_marginal_likelihood"], rel=1e-12)
    assert two["elbo"] == pytest.approx(one["elbo"], rel=1e-12)

    vae, saved = model_from_bytes(load_checkpoint_bytes(trained["run"])[0])
    data = ParquetDataset(trained["test"])
    # The same computation in this process, row group by row group.
    local = evaluate_units(vae, data, list(range(len(data.units))), num_importance_samples=200, seed=3).summary()
    assert local["log_marginal_likelihood"] == pytest.approx(one["log_marginal_likelihood"], rel=1e-12)
    # And independently: the plain function on the whole (statically binarized) split, other noise.
    x = torch.from_numpy(binarize(read_all(data), "static", seed=3, epoch=0).x)
    torch.manual_seed(0)
    direct = log_marginal_likelihood(vae, x, 2000, chunk_size=500).mean().item()
    assert abs(direct - one["log_marginal_likelihood"]) < 4 * one["log_marginal_likelihood_sem"] + 0.05
    precise_elbo = sgvb_b(vae, x, 2000).mean().item()
    assert precise_elbo < direct  # the ELBO bounds log p(x) from below
    assert abs(precise_elbo - one["elbo"]) < 4 * one["elbo_sem"]


def test_the_test_elbo_training_logs_is_the_one_evaluate_computes(trained):
    """Training's test-set evaluation is eval/evaluation.py's (row groups' noise from the run's seed): its last
    logged test ELBO is what `aevb-dist evaluate --seed <the run's seed>` says of the final checkpoint."""
    import fsspec

    from aevb_dist.run.metrics import read_metrics

    vae, saved = model_from_bytes(load_checkpoint_bytes(trained["run"])[0])
    last = read_metrics(fsspec.filesystem("file"), f"{trained['run']}/metrics.csv")[-1]
    assert last["step"] == saved["state"]["step"] == 60 and math.isfinite(last["test_elbo"])
    seed = saved["config"]["seed"]
    result = evaluate(trained["run"], trained["test"], num_importance_samples=1, num_workers=2, seed=seed)
    assert result["elbo"] == pytest.approx(last["test_elbo"], rel=1e-9)
    other = evaluate(trained["run"], trained["test"], num_importance_samples=1, num_workers=1, seed=seed + 1)
    assert other["elbo"] != pytest.approx(last["test_elbo"], rel=1e-9)  # the comparison can fail


def test_evaluate_use_gpu_on_a_cluster_without_gpus_is_refused_at_once(trained):
    """--use-gpu asks for a GPU per Ray task; a cluster without one is told so (a ValueError: one line on
    the command line), never left waiting for tasks that cannot be placed."""
    with pytest.raises(ValueError, match="--use-gpu: the Ray cluster has no GPU"):
        evaluate(trained["run"], trained["test"], num_importance_samples=10, num_workers=1, use_gpu=True)


def test_evaluate_and_encode_refuse_a_datasets_root_naming_the_split(trained, tmp_path):
    root = trained["test"].rsplit("/", 1)[0]
    for command in (
        lambda: evaluate(trained["run"], root, num_importance_samples=10),
        lambda: encode(trained["run"], root, str(tmp_path / "codes")),
    ):
        with pytest.raises(
            ValueError,
            match=f"holds the splits train/ and test/ of a prepared dataset, not one split: pass {root}/train or ",
        ):
            command()
    assert not (tmp_path / "codes").exists()


def test_an_evaluation_is_kept_in_its_run_folder_one_file_per_split_and_estimator(trained, tmp_path, capsys):
    """What `aevb-dist evaluate` does (save_in_run_folder): the JSON beside the model it scored, whether a run
    folder or one of its checkpoints was named."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    newest = max(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint_"))
    scored = evaluate(run, trained["test"], num_importance_samples=10, num_workers=1, save_in_run_folder=True)
    assert json.loads((tmp_path / "run" / "eval_test.json").read_text()) == scored
    assert f"wrote {run}/eval_test.json" in capsys.readouterr().err
    ais = evaluate(
        f"{run}/{newest}",
        trained["train"],
        num_importance_samples=2,
        num_workers=1,
        estimator="ais",
        num_steps=5,
        save_in_run_folder=True,
    )
    assert json.loads((tmp_path / "run" / "eval_train_ais.json").read_text()) == ais
    assert json.loads((tmp_path / "run" / "eval_test.json").read_text()) == scored  # the other kept
    # Where the file cannot be written (here a folder is in its way; a read-only bucket alike), the result
    # stands, with a warning.
    (tmp_path / "run" / "eval_test.json").unlink()
    (tmp_path / "run" / "eval_test.json").mkdir()
    again = evaluate(run, trained["test"], num_importance_samples=10, num_workers=1, save_in_run_folder=True)
    assert again == scored and "warning: could not keep the evaluation in" in capsys.readouterr().err


def test_evaluate_cli_prints_json_and_writes_output(trained, tmp_path):
    result = evaluate(
        trained["run"],
        trained["test"],
        num_importance_samples=10,
        num_workers=2,
        output_uri=str(tmp_path / "eval.json"),
    )
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["num_importance_samples"] == 10 and written["elbo"] == result["elbo"]
    for key in ("elbo", "log_marginal_likelihood", "num_examples", "elbo_sem", "log_marginal_likelihood_sem"):
        assert key in written and math.isfinite(written[key])


def test_evaluate_rejects_bad_arguments(trained, tmp_path):
    for k in (0, -1):
        with pytest.raises(ValueError, match="must be at least 1"):
            evaluate(trained["run"], trained["test"], num_importance_samples=k)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate(str(tmp_path / "nope"), trained["test"])
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ValueError, match="neither a checkpoint folder nor a run folder"):
        evaluate(str(tmp_path / "empty_run"), trained["test"])


def test_encode_writes_one_row_per_example(trained, tmp_path):
    out = str(tmp_path / "codes")
    assert encode(trained["run"], trained["train"], out, num_workers=2) == 270
    table = pq.read_table(out)
    indices = table.column("index").to_pylist()
    assert table.num_rows == 270 and len(set(indices)) == 270
    assert sorted(indices) == sorted(read_all(ParquetDataset(trained["train"])).index.tolist())
    vae, _ = model_from_bytes(load_checkpoint_bytes(trained["run"])[0])
    data = read_all(ParquetDataset(trained["train"]))
    x = torch.from_numpy(binarize(data, "static", seed=0, epoch=0).x)
    mean, logvar = vae.encode(x)
    order = {int(i): k for k, i in enumerate(data.index)}
    rows = [order[i] for i in table.column("index").to_pylist()]
    got_mean = np.stack(table.column("mean").to_numpy(zero_copy_only=False))
    got_std = np.stack(table.column("std").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got_mean, mean.detach().numpy()[rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_std, torch.exp(0.5 * logvar).detach().numpy()[rows], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        encode(trained["run"], trained["train"], out)


def test_plot_writes_pngs_including_the_2d_manifold(trained, tmp_path):
    written = plot_run(trained["run"], str(tmp_path / "plots"))
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == ["learning_curve.png", "manifold.png", "samples.png"]
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_image_grids_are_readable_at_any_image_size_and_in_color(tmp_path):
    """8×8 digits drawn at >= 48 screen pixels a tile (the figure once drew them 16 pixels wide), tiles parted
    by gray lines, and [3, H, W] images in color."""
    import matplotlib.image

    from aevb_dist.eval.plotting import BORDER_PX, MIN_TILE_PX, image_grid

    digits = np.zeros((100, 64), dtype=np.float32)
    digits[:, 27:29] = 1.0  # two white pixels in the middle of each 8×8 tile
    write_figure(image_grid(digits, [8, 8], 10, "digits"), str(tmp_path / "digits.png"))
    png = matplotlib.image.imread(tmp_path / "digits.png")
    assert png.shape[1] >= 10 * (MIN_TILE_PX + BORDER_PX)
    gray = np.abs(png[..., :3] - 0.5).max(axis=2) < 0.01
    assert gray.sum(axis=0).max() > 0.9 * 10 * MIN_TILE_PX  # whole columns of border between tiles
    color = np.zeros((4, 3, 5, 5), dtype=np.float32)
    color[:, 0] = 1.0  # red channel, channels first
    color[1, 0], color[1, 2] = 0.0, 1.0  # the second image blue
    write_figure(image_grid(color.reshape(4, -1), [3, 5, 5], 2, "color"), str(tmp_path / "color.png"))
    rgb = matplotlib.image.imread(tmp_path / "color.png")[..., :3].reshape(-1, 3)
    reds = (rgb[:, 0] > 0.9) & (rgb[:, 1] < 0.1) & (rgb[:, 2] < 0.1)
    blues = (rgb[:, 2] > 0.9) & (rgb[:, 0] < 0.1) & (rgb[:, 1] < 0.1)
    assert reds.sum() >= 3 * MIN_TILE_PX**2 * 0.9 and blues.sum() >= MIN_TILE_PX**2 * 0.9


def test_gradient_variance_of_a_b_and_iwae(trained, tmp_path):
    vae, _ = model_from_bytes(load_checkpoint_bytes(trained["run"])[0])
    x = torch.from_numpy(binarize(read_all(ParquetDataset(trained["train"])), "static", seed=0, epoch=0).x[:50])
    report = variance_report(vae, x, num_draws=200)
    # θ's gradient is ∇θ log p(x|z) under both estimators: the same noise gives the same decoder gradients.
    assert report["A"]["decoder_variance"] == pytest.approx(report["B"]["decoder_variance"], rel=1e-6)
    assert report["A"]["encoder_variance"] > report["B"]["encoder_variance"] > 0
    assert report["variance_ratio_A_over_B"] > 1
    sweep = variance_sweep(vae, x, latent_samples=(1, 8), num_draws=100)
    one, eight = sweep["results"]
    # The IWAE bound with K=1 is estimator A, draw for draw.
    assert one["iwae"]["total_variance"] == pytest.approx(one["A"]["total_variance"], rel=1e-6)
    for est in ("A", "B"):  # L samples average L independent gradients: variance falls about L-fold
        assert eight[est]["total_variance"] < one[est]["total_variance"] / 3
    png = tmp_path / "variance.png"
    write_figure(gradient_variance_figure(sweep), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_with_ais_and_appendix_d_across_workers(trained):
    vae, _ = model_from_bytes(load_checkpoint_bytes(trained["run"])[0])
    data = ParquetDataset(trained["test"])
    is_result = evaluate(trained["run"], trained["test"], num_importance_samples=2000, num_workers=1, seed=5)
    for estimator in ("ais", "appendix-d"):
        opts = dict(num_importance_samples=8, num_steps=60, num_leapfrog=3, seed=5)
        result = evaluate(trained["run"], trained["test"], num_workers=2, estimator=estimator, **opts)
        assert result["estimator"] == estimator and result["num_steps"] == 60 and result["num_examples"] == 30
        local = evaluate_units(
            vae,
            data,
            list(range(len(data.units))),
            estimator=estimator,
            num_leapfrog=3,
            **{k: v for k, v in opts.items() if k != "num_leapfrog"},
        ).summary()
        assert result["log_marginal_likelihood"] == pytest.approx(local["log_marginal_likelihood"], rel=1e-9)
        assert abs(result["log_marginal_likelihood"] - is_result["log_marginal_likelihood"]) < 0.5
    with pytest.raises(ValueError, match="--estimator='hm' is not one of: is, ais, appendix-d"):
        evaluate(trained["run"], trained["test"], estimator="hm")


def test_a_bad_row_group_found_by_a_ray_task_is_one_line(trained, tmp_path):
    import os
    import subprocess
    import sys

    import pyarrow as pa

    pixels = np.random.default_rng(0).random((20, 16)).astype(np.float32)
    pixels[13, 2] = np.nan  # only a worker reading this row group can see it
    flat = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 16)
    pq.write_table(pa.table({"pixels": flat, "index": pa.array(np.arange(20))}), str(tmp_path / "part-0.parquet"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "aevb_dist", "evaluate", trained["run"], str(tmp_path), "-k", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "aevb-dist evaluate: error:" in line]
    assert len(errors) == 1 and "NaN or inf pixel values" in errors[0]
