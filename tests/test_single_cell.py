"""Count matrices end to end: .h5ad, 10x and .npz converted to the sparse Parquet layout, read back exactly,
refused in one line where they hold no counts, and trained on with a count likelihood."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import sparse

from aevb_dist.config import load_config
from aevb_dist.data import count_sources, prepare_counts
from aevb_dist.data.epoch_stream import EpochStream
from aevb_dist.data.prepare import CountOptions, prepare
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.data.schema import META_COVARIATES, META_LABEL_NAMES
from aevb_dist.data.sparse_rows import CsrRows
from aevb_dist.eval.evaluation import evaluate_units
from aevb_dist.eval.jobs import clustering_scores
from aevb_dist.eval.model_input import to_device
from aevb_dist.model.vae import VAE
from aevb_dist.train.worker import trainer_for_config
from tests import atlas as atlases
from tests.helpers import aevb, error_lines

GENES = 50


@pytest.fixture(scope="module")
def atlas():
    return atlases.synthetic_atlas(num_cells=600, num_genes=GENES, seed=3)


def _prepared(atlas, tmp_path, fmt, **options):
    source = {
        "h5ad": lambda: atlases.write_h5ad(atlas, str(tmp_path / "atlas.h5ad")),
        "10x": lambda: atlases.write_10x(atlas, str(tmp_path / "filtered_feature_bc_matrix")),
        "npz": lambda: atlases.write_npz(atlas, str(tmp_path / "atlas.npz")),
    }[fmt]()
    out = str(tmp_path / "out")
    counts = prepare(
        source, out, num_shards=3, rows_per_row_group=64, count_options=CountOptions(**options), report=lambda m: None
    )
    return out, counts


def _dense_rows(dataset: ParquetDataset):
    """Every row of the dataset, densified as the step densifies them, with its index and label."""
    xs, index, labels = [], [], []
    for unit in dataset.units:
        batch = dataset.read(unit)
        assert isinstance(batch.x, CsrRows)
        xs.append(to_device(batch.x, torch.device("cpu")).numpy())
        index.append(batch.index)
        labels.append(batch.label)
    return np.concatenate(xs), np.concatenate(index), None if labels[0] is None else np.concatenate(labels)


@pytest.mark.parametrize(
    "fmt, options",
    [
        ("h5ad", dict(layer="counts", batch_key="donor", labels_key="cell_type")),
        ("10x", {}),
        ("npz", dict(batch_key="donor", labels_key="cell_type")),
    ],
)
def test_a_count_matrix_converts_to_sparse_parquet_and_reads_back_exactly(atlas, tmp_path, fmt, options, monkeypatch):
    monkeypatch.setattr(prepare_counts, "BUCKET_ROWS", 100)  # the storage order's shuffle through 6 buckets
    monkeypatch.setattr(prepare_counts, "ROWS_PER_CHUNK", 250)  # the source read in 3 chunks
    out, counts = _prepared(atlas, tmp_path, fmt, **options)
    dense = atlas.counts.toarray()
    assert counts == {"train": 540, "test": 60}
    seen = []
    for split in ("train", "test"):
        data = ParquetDataset(f"{out}/{split}")
        assert data.counts and data.dim == GENES and data.num_rows == counts[split]
        x, index, label = _dense_rows(data)
        np.testing.assert_array_equal(x, dense[index])  # every count, at its gene, of its cell
        seen.append(index)
        table = pq.read_table(f"{out}/{split}")
        np.testing.assert_array_equal(table.column("library_size").to_numpy(), dense[table.column("index")].sum(1))
        if "labels_key" in options:
            names = json.loads(table.schema.metadata[META_LABEL_NAMES])
            assert [names[v] for v in label] == list(atlas.cell_type[index])
            batches = json.loads(table.schema.metadata[META_COVARIATES])["batch"]
            assert [batches[v] for v in table.column("batch").to_numpy()] == list(atlas.batch[table.column("index")])
            assert data.covariates == {"batch": ["batch_0", "batch_1"]}
    train, test = seen
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(600))


def test_a_10x_folder_and_an_npz_are_recognized_without_format(atlas, tmp_path):
    folder = atlases.write_10x(atlas, str(tmp_path / "tenx"))
    prepare(folder, str(tmp_path / "a"), report=lambda m: None)
    npz = atlases.write_npz(atlas, str(tmp_path / "m.npz"))
    prepare(npz, str(tmp_path / "b"), report=lambda m: None)
    for out in ("a", "b"):
        assert ParquetDataset(str(tmp_path / out / "train")).counts


@pytest.mark.parametrize("fmt", ["10x", "npz"])
def test_a_10x_matrix_and_an_npz_stream_in_chunks_of_cells_equal_to_the_whole_matrix(tmp_path, monkeypatch, fmt):
    """Read as they decompress, a few entries at a time, cut into cells: empty cells first, inside and last."""
    rng = np.random.default_rng(5)
    dense = rng.integers(0, 4, size=(57, 11)) * (rng.random((57, 11)) < 0.3)
    dense[[0, 1, 20, 21, 22, 56]] = 0
    small = atlases.Atlas(
        sparse.csr_matrix(dense.astype(np.int32)), np.array(["t"] * 57), np.array(["b"] * 57), list("ABCDEFGHIJK")
    )
    if fmt == "10x":
        source = atlases.write_10x(small, str(tmp_path / "tenx"))
    else:
        source = atlases.write_npz(small, str(tmp_path / "m.npz"))
    monkeypatch.setattr(count_sources, "MTX_BLOCK_BYTES", 24)  # a read of 2-3 entries ends inside a cell, often
    matrix = prepare_counts.open_matrix(source, fmt, None, [])
    for cells_per_chunk in (1, 4, 57, 100):
        chunks = list(matrix.chunks(cells_per_chunk))
        assert [start for start, _ in chunks] == list(range(0, 57, cells_per_chunk))
        assert all(c.shape[1] == 11 for _, c in chunks)
        assert np.array_equal(sparse.vstack([c for _, c in chunks]).toarray(), dense)


@pytest.mark.parametrize("fmt", ["10x", "npz", "h5ad"])
def test_a_source_not_in_cell_order_is_read_whole_saying_so_into_the_same_dataset(atlas, tmp_path, fmt):
    options = CountOptions(layer="counts" if fmt == "h5ad" else None)
    if fmt == "h5ad":  # AnnData stores a matrix CSC where the analysis left it so (column slicing is fast)
        in_order = atlases.write_h5ad(atlas, str(tmp_path / "rows.h5ad"))
        out_of_order = atlases.write_h5ad(atlas, str(tmp_path / "columns.h5ad"), matrix_format="csc")
    elif fmt == "10x":
        in_order = atlases.write_10x(atlas, str(tmp_path / "by_barcode"))
        out_of_order = atlases.write_10x(atlas, str(tmp_path / "by_gene"), entry_order="feature")
    else:
        in_order = atlases.write_npz(atlas, str(tmp_path / "rows.npz"))
        out_of_order = atlases.write_npz(atlas, str(tmp_path / "columns.npz"), matrix_format="csc")
    said = []
    prepare(in_order, str(tmp_path / "a"), num_shards=2, count_options=options, report=said.append)
    assert not any("read whole" in line for line in said)
    prepare(out_of_order, str(tmp_path / "b"), num_shards=2, count_options=options, report=said.append)
    (told,) = [line for line in said if "read whole" in line]
    assert {"10x": "not sorted by barcode", "npz": "holds a CSC matrix", "h5ad": "stored CSC"}[fmt] in told
    for split in ("train", "test"):
        a, b = pq.read_table(str(tmp_path / "a" / split)), pq.read_table(str(tmp_path / "b" / split))
        assert a.to_pydict() == b.to_pydict()  # the same cells, counts and order


def test_a_matrix_without_counts_is_refused_naming_its_layer(atlas, tmp_path):
    path = atlases.write_h5ad(atlas, str(tmp_path / "atlas.h5ad"))
    with pytest.raises(ValueError, match=r"atlas.h5ad: X holds .* at row \d+: counts must be non-negative integers"):
        prepare(path, str(tmp_path / "out"), report=lambda m: None)
    with pytest.raises(ValueError, match="has no layer 'raw' \\(its layers: counts\\)"):
        prepare(path, str(tmp_path / "out"), count_options=CountOptions(layer="raw"), report=lambda m: None)
    with pytest.raises(ValueError, match="has no cell annotation 'sample' \\(its obs columns: cell_type, donor\\)"):
        options = CountOptions(layer="counts", batch_key="sample")
        prepare(path, str(tmp_path / "out"), count_options=options, report=lambda m: None)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_the_command_line_takes_scvi_tools_key_names_and_tells_a_bad_layer_in_one_line(atlas, tmp_path):
    path = atlases.write_h5ad(atlas, str(tmp_path / "atlas.h5ad"))
    args = ["prepare", path, str(tmp_path / "out"), "--format", "h5ad", "--layer", "counts"]
    done = aevb(*args, "--batch-key", "donor", "--labels-key", "cell_type", "--categorical-covariate-keys", "donor")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(str(tmp_path / "out" / "train"))
    assert {"batch", "donor", "label"} <= set(table.column_names)
    failed = aevb("prepare", path, str(tmp_path / "other"), "--layer", "spliced")
    assert failed.returncode == 2 and len(error_lines(failed.stderr)) == 1
    assert "has no layer 'spliced'" in error_lines(failed.stderr)[0]


def test_shuffled_epochs_of_counts_deal_every_cell_once_as_sparse_rows(atlas, tmp_path):
    out, _ = _prepared(atlas, tmp_path, "npz")
    data = ParquetDataset(f"{out}/train")
    stream = EpochStream(data, rank=0, world_size=1, batch_size=50, epoch=1, seed=0, window=2)
    batches = list(stream)
    assert all(isinstance(b.x, CsrRows) for b in batches)
    index = np.concatenate([b.index for b in batches])
    assert sorted(index) == sorted(_dense_rows(data)[1]) and not np.array_equal(index, np.sort(index))
    dense = atlas.counts.toarray()
    for b in batches:
        np.testing.assert_array_equal(to_device(b.x, torch.device("cpu")).numpy(), dense[b.index])


def test_a_likelihood_must_fit_the_data(atlas, tmp_path):
    out, _ = _prepared(atlas, tmp_path, "npz")
    data = ParquetDataset(f"{out}/train")
    with pytest.raises(ValueError, match="holds counts, and model.likelihood=bernoulli is not a count likelihood"):
        data.check_fits_likelihood("bernoulli", f"{out}/train")
    data.check_fits_likelihood("zinb", f"{out}/train")


def _config(out, tmp_path, likelihood="negative_binomial", *extra):
    return load_config(
        "configs/single_cell_nb.yaml",
        [
            f"data.train_uri={out}/train",
            f"data.test_uri={out}/test",
            f"model.input_dim={GENES}",
            f"model.likelihood={likelihood}",
            "model.hidden_sizes=[32]",
            "train.batch_size_per_worker=64",
            f"run.storage_uri={tmp_path}/runs",
            "optim.lr=0.01",
            *extra,
        ],
    )


@pytest.mark.parametrize("likelihood", ["negative_binomial", "zinb", "poisson", "multinomial"])
def test_training_on_counts_raises_the_test_elbo(atlas, tmp_path, likelihood):
    out, _ = _prepared(atlas, tmp_path, "npz")
    trainer = trainer_for_config(_config(out, tmp_path, likelihood))
    before = trainer.evaluate(trainer.test_data)
    for _ in range(3):
        for batch in trainer.source.epoch_batches(0, 0):
            elbo, count = trainer.step_on(batch)
            assert math.isfinite(elbo) and count > 0
    after = trainer.evaluate(trainer.test_data)
    assert math.isfinite(before) and after > before + 10.0, (before, after)


def test_a_run_resumes_only_on_the_genes_it_was_trained_on(atlas, tmp_path):
    out, _ = _prepared(atlas, tmp_path, "10x")
    trainer = trainer_for_config(_config(out, tmp_path))
    saved = trainer.state_dict()
    assert saved["counts"]["features_sha256"]
    trainer_for_config(_config(out, tmp_path), saved=saved)  # the same data: resumes
    renamed = atlases.synthetic_atlas(num_cells=600, num_genes=GENES, seed=3)
    renamed.genes = list(reversed(renamed.genes))
    other = str(tmp_path / "other")
    prepare(atlases.write_10x(renamed, str(tmp_path / "renamed")), other, report=lambda m: None)
    with pytest.raises(ValueError, match="genes .* differ from those the run was trained on"):
        trainer_for_config(_config(other, tmp_path), saved=saved)


def test_counts_are_not_held_in_the_device_cache(atlas, tmp_path):
    out, _ = _prepared(atlas, tmp_path, "npz")
    with pytest.raises(ValueError, match="data.cache_on_device=true holds dense images"):
        trainer_for_config(_config(out, tmp_path, "negative_binomial", "data.cache_on_device=true"))


def _distinct_per_batch(labels: np.ndarray, batch_size: int) -> float:
    return float(np.mean([len(set(labels[i : i + batch_size])) for i in range(0, len(labels), batch_size)]))


def test_an_atlas_sorted_by_cell_type_is_stored_so_that_batches_mix_types_as_a_full_shuffle_would(
    tmp_path, monkeypatch
):
    """Atlases come sorted (by donor, dataset, type). Stored in that order, a batch would hold the cells of the few
    row groups in the reader's shuffle window: one or two types where a random permutation gives them all."""
    monkeypatch.setattr(prepare_counts, "BUCKET_ROWS", 1000)  # memory for 1,000 cells: 6 buckets of the train split
    monkeypatch.setattr(prepare_counts, "ROWS_PER_CHUNK", 500)
    sorted_atlas = atlases.synthetic_atlas(num_cells=6000, num_genes=20, num_types=40, seed=5, sort_by_type=True)
    path = atlases.write_npz(sorted_atlas, str(tmp_path / "sorted.npz"))
    options = CountOptions(labels_key="cell_type")
    prepare(path, str(tmp_path / "out"), rows_per_row_group=200, count_options=options, report=lambda m: None)
    data = ParquetDataset(str(tmp_path / "out" / "train"))
    stream = EpochStream(data, rank=0, world_size=1, batch_size=128, epoch=0, seed=0, window=4)
    streamed = _distinct_per_batch(np.concatenate([b.label for b in stream]), 128)
    labels = np.concatenate([data.read(u).label for u in data.units])
    permuted = np.mean([_distinct_per_batch(np.random.default_rng(s).permutation(labels), 128) for s in range(5)])
    in_source_order = _distinct_per_batch(np.sort(labels), 128)
    assert in_source_order < 0.3 * permuted  # what a reader of the sorted order would get, at best
    assert streamed >= 0.9 * permuted, (streamed, permuted)


def test_a_model_conditioned_on_the_batch_reads_its_codes_beside_x_and_z():
    vae = VAE(input_dim=GENES, hidden_sizes=[16], latent_dim=3, likelihood="negative_binomial", covariate_sizes=(2, 3))
    assert vae.encoder[0].in_features == GENES + 5 and vae.decoder[0].in_features == 3 + 5
    counts = torch.from_numpy(atlases.synthetic_atlas(num_cells=4, num_genes=GENES).counts.toarray()).float()
    codes = torch.tensor([[0, 2], [1, 0], [0, 1], [1, 2]]).float()
    x = torch.cat([counts, codes], 1)
    z = torch.zeros(1, 4, 3)
    other_batch = torch.cat([counts, torch.stack([1 - codes[:, 0], codes[:, 1]], 1)], 1)
    assert not torch.allclose(vae.log_likelihood(x, z), vae.log_likelihood(other_batch, z))
    assert not torch.allclose(vae.encode(x)[0], vae.encode(other_batch)[0])
    with pytest.raises(ValueError, match=r"expected inputs of shape \[batch, 52\]"):
        vae.encode(counts)
    with pytest.raises(ValueError, match="conditioned on covariates"):
        vae.decode(z)


def test_training_conditioned_on_the_batch_key(atlas, tmp_path):
    out, _ = _prepared(atlas, tmp_path, "npz", batch_key="donor", labels_key="cell_type")
    cfg = _config(out, tmp_path, "negative_binomial", "model.covariates=[batch]")
    trainer = trainer_for_config(cfg)
    assert trainer.vae.covariate_sizes == (2,)
    batch = next(iter(trainer.source.epoch_batches(0, 0)))
    assert batch.x_BD.shape[1] == GENES + 1  # the batch's code beside the counts
    np.testing.assert_array_equal(batch.x_BD[:, GENES].numpy(), [int(b[-1]) for b in atlas.batch[batch.index_B]])
    before = trainer.evaluate(trainer.test_data)
    for _ in range(3):
        for step_batch in trainer.source.epoch_batches(0, 0):
            trainer.step_on(step_batch)
    assert trainer.evaluate(trainer.test_data) > before + 10.0


def test_evaluation_of_cells_splits_the_elbo_and_scores_the_latents_clusters_against_the_labels(atlas, tmp_path):
    out, _ = _prepared(atlas, tmp_path, "npz", labels_key="cell_type")
    trainer = trainer_for_config(_config(out, tmp_path))
    for _ in range(4):
        for batch in trainer.source.epoch_batches(0, 0):
            trainer.step_on(batch)
    test = trainer.test_data
    sums = evaluate_units(
        trainer.vae, test, list(range(len(test.units))), num_importance_samples=0, binarization="none"
    )
    summary = sums.summary()
    assert summary["reconstruction"] - summary["kl"] == pytest.approx(summary["elbo"]) and summary["kl"] > 0
    assert sums.labelled_means.shape == (60, 10) and len(sums.labels) == 60
    scores = clustering_scores(sums.labelled_means, sums.labels, seed=0)
    # Three well-separated planted types: the trained latents cluster by type; shuffled labels do not.
    assert scores["kmeans_ari"] > 0.8 and scores["kmeans_nmi"] > 0.8, scores
    shuffled = clustering_scores(sums.labelled_means, np.random.default_rng(0).permutation(sums.labels), seed=0)
    assert shuffled["kmeans_ari"] < 0.2


def test_a_covariate_the_data_lacks_is_refused_naming_those_it_has(atlas, tmp_path):
    out, _ = _prepared(atlas, tmp_path, "npz", batch_key="donor")
    with pytest.raises(ValueError, match=r"has no covariate 'sample' \(its covariates: batch"):
        trainer_for_config(_config(out, tmp_path, "negative_binomial", "model.covariates=[sample]"))
    with pytest.raises(ValueError, match="model.covariates condition models of counts"):
        load_config(None, ["model.covariates=[batch]"])


@pytest.mark.slow
def test_h5ad_to_latents_for_scanpy_through_the_command_line(atlas, tmp_path):
    """The walkthrough of docs/single_cell.md: prepare, train (local mode) conditioned on the batch, evaluate,
    encode, and the latents joined back to the .h5ad's cells by `index`."""
    import anndata
    import pandas as pd

    path = atlases.write_h5ad(atlas, str(tmp_path / "atlas.h5ad"))
    data, run = str(tmp_path / "data"), str(tmp_path / "runs" / "single_cell_nb")
    done = aevb("prepare", path, data, "--layer", "counts", "--batch-key", "donor", "--labels-key", "cell_type")
    assert done.returncode == 0, done.stderr
    overrides = [f"data.train_uri={data}/train", f"data.test_uri={data}/test", f"model.input_dim={GENES}"]
    overrides += [
        "model.covariates=[batch]",
        "ray.local_mode=true",
        "train.num_epochs=2",
        f"run.storage_uri={tmp_path}/runs",
    ]
    done = aevb("train", "configs/single_cell_nb.yaml", *overrides)
    assert done.returncode == 0, done.stderr
    evaluated = aevb("evaluate", run, f"{data}/test", "-k", "10")
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads(evaluated.stdout)
    assert math.isfinite(scores["log_marginal_likelihood"]) and scores["kmeans_num_cells"] == 60
    assert scores["reconstruction"] - scores["kl"] == pytest.approx(scores["elbo"])
    assert aevb("encode", run, f"{data}/test", str(tmp_path / "codes")).returncode == 0
    codes = pd.read_parquet(str(tmp_path / "codes")).sort_values("index")
    cells = anndata.read_h5ad(path)[codes["index"].to_numpy()]
    assert len(cells) == 60 and np.stack(codes["mean"].to_numpy()).shape == (60, 10)
    names = json.loads(pq.read_schema(f"{data}/test/part-00000.parquet").metadata[META_LABEL_NAMES])
    assert [names[v] for v in codes["label"]] == list(cells.obs["cell_type"])
    assert [f"batch_{v}" for v in codes["batch"]] == list(cells.obs["donor"])  # the covariate beside each cell
    plotted = aevb("plot", run, "--data", f"{data}/test")
    assert plotted.returncode == 0, plotted.stderr
    assert {"learning_curve.png", "latents_by_label.png", "latents_by_batch.png"} <= {
        line.rsplit("/", 1)[-1] for line in plotted.stdout.split()
    }


@pytest.mark.slow
def test_counts_train_the_same_model_on_one_and_two_workers_and_through_a_resize(atlas, tmp_path):
    """With train.global_batch_size, a model of counts conditioned on the batch does not depend on the worker
    count, nor on a stop and a resume with another (within fp32 reduction order)."""
    from aevb_dist.train.driver import train
    from tests.helpers import final_state

    out, _ = _prepared(atlas, tmp_path, "npz", batch_key="donor")

    def run(name, workers, steps):
        extra = ["model.covariates=[batch]", "train.global_batch_size=64", "data.num_partitions=4"]
        extra += [f"train.num_workers={workers}", f"train.max_steps={steps}", "checkpoint.every_steps=5"]
        return train(_config(out, tmp_path, "negative_binomial", *extra, f"run.name={name}", "ray.local_mode=true"))

    run("straight", 1, 20)
    run("two", 2, 20)
    run("resized", 2, 9)  # stops mid-epoch, resumed with one worker
    run("resized", 1, 20)
    states = {n: final_state(f"{tmp_path}/runs/{n}") for n in ("straight", "two", "resized")}
    for name in ("two", "resized"):
        assert states[name]["state"]["samples_seen"] == states["straight"]["state"]["samples_seen"]
        for key, value in states["straight"]["model"].items():
            difference = (states[name]["model"][key] - value).abs().max() / value.abs().max()
            assert difference <= 1e-5, (name, key)


@pytest.mark.slow
def test_counts_streamed_from_s3_and_resumed_train_bit_for_bit_as_from_local_disk_straight(
    atlas, tmp_path, s3_endpoint
):
    """The same cells prepared onto S3 and onto local disk; a run on S3, stopped at step 8 and resumed to 16, ends
    with the parameters of a run on local disk that went straight to 16, bit for bit."""
    from aevb_dist.train.driver import train
    from tests.helpers import assert_bitwise_equal, final_state

    source = atlases.write_npz(atlas, str(tmp_path / "atlas.npz"))
    options = CountOptions(batch_key="donor")
    remote, local = "s3://aevb-test/datasets/cells", str(tmp_path / "cells")
    prepare(source, remote, num_shards=3, rows_per_row_group=64, count_options=options, endpoint_url=s3_endpoint)
    prepare(source, local, num_shards=3, rows_per_row_group=64, count_options=options, report=lambda m: None)

    def run(data, name, steps):
        extra = ["model.covariates=[batch]", f"train.max_steps={steps}", "checkpoint.every_steps=4"]
        extra += [f"run.s3_endpoint_url={s3_endpoint}", f"run.name={name}", "ray.local_mode=true"]
        return train(_config(data, tmp_path, "zinb", *extra))

    run(remote, "on_s3", 8)
    run(remote, "on_s3", 16)
    run(local, "straight", 16)
    assert_bitwise_equal(final_state(f"{tmp_path}/runs/on_s3"), final_state(f"{tmp_path}/runs/straight"))


def test_a_covariate_column_name_taken_twice_is_refused_before_reading(atlas, tmp_path):
    path = atlases.write_npz(atlas, str(tmp_path / "atlas.npz"))
    for keys, taken in ((("batch",), "by --batch-key"), (("label",), "by the layout")):
        options = CountOptions(batch_key="donor", categorical_covariate_keys=keys)
        with pytest.raises(ValueError, match=f"a column named '{keys[0]}' is already written \\({taken}\\)"):
            prepare(path, str(tmp_path / "out"), count_options=options, report=lambda m: None)


def test_image_options_given_with_a_count_matrix_are_refused_not_ignored(atlas, tmp_path):
    from aevb_dist.data.images import ImageOptions

    path = atlases.write_npz(atlas, str(tmp_path / "atlas.npz"))
    for options in (dict(value_range=(0.0, 255.0)), dict(image_options=ImageOptions(grayscale=True))):
        with pytest.raises(ValueError, match="are for images, not --format npz: counts are kept as they are"):
            prepare(path, str(tmp_path / "out"), report=lambda m: None, **options)
    prepare(path, str(tmp_path / "out"), image_options=ImageOptions(), report=lambda m: None)  # the defaults pass
