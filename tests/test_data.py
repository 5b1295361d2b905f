"""`aevb-dist prepare` on real files and the streaming reader's guarantees."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aevb_dist.data.binarization import binarize
from aevb_dist.data.epoch_stream import EpochStream, assign_row_groups
from aevb_dist.data.prepare import prepare
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.data.sources import read_frey_face, read_idx
from tests.helpers import aevb, read_all, shared_data

quiet = dict(report=lambda message: None)


@pytest.fixture(scope="module")
def mnist_uri(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pq") / "mnist")
    proc = aevb("prepare", shared_data("mnist"), out, "--format", "mnist", "--num-shards", "3")
    assert proc.returncode == 0, proc.stderr
    assert "train shard 3/3 written" in proc.stderr  # progress is shown
    return out


def test_mnist_round_trip_equals_the_source_pixels(mnist_uri):
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = ParquetDataset(f"{mnist_uri}/{split}", expected_dim=784)
        source = read_idx(shared_data(f"mnist/{prefix}-images-idx3-ubyte.gz")).reshape(-1, 784)
        labels = read_idx(shared_data(f"mnist/{prefix}-labels-idx1-ubyte.gz"))
        assert ds.num_rows == {"train": 60_000, "test": 10_000}[split]
        assert ds.shape == [28, 28] and ds.value_range == (0.0, 255.0)
        table = pq.read_table(f"{mnist_uri}/{split}")
        assert table.schema.field("pixels").type == pa.binary(784)  # one byte per pixel
        raw = np.frombuffer(b"".join(table.column("pixels").to_pylist()), np.uint8).reshape(-1, 784)
        order = table.column("index").to_numpy()
        np.testing.assert_array_equal(raw, source[order])
        np.testing.assert_array_equal(table.column("label").to_numpy(), labels[order])
        assert sorted(order) == list(range(ds.num_rows))
    sample = read_all(ParquetDataset(f"{mnist_uri}/test"))
    np.testing.assert_allclose(sample.x, source[sample.index] / 255.0, rtol=0, atol=1e-7)


def test_frey_face_round_trip_with_a_deterministic_split(tmp_path):
    frey = shared_data("frey_rawface.mat")
    counts = prepare(frey, str(tmp_path / "a"), **quiet)
    prepare(frey, str(tmp_path / "b"), **quiet)
    assert counts == {"train": 1769, "test": 196}
    faces = read_frey_face(frey).reshape(-1, 560)
    seen = []
    for split in ("train", "test"):
        a = ParquetDataset(str(tmp_path / "a" / split), expected_dim=560)
        b = read_all(ParquetDataset(str(tmp_path / "b" / split)))
        got = read_all(a)
        np.testing.assert_array_equal(got.index, b.index)
        np.testing.assert_allclose(got.x, faces[got.index] / 255.0, atol=1e-7)
        assert a.shape == [28, 20] and not a.has_label
        seen.append(got.index)
    assert sorted(np.concatenate(seen)) == list(range(1965))


def test_npz_round_trip_through_memory_filesystem():
    rng = np.random.default_rng(0)
    x = rng.random((50, 3, 4)).astype(np.float64)
    labels = rng.integers(0, 5, 50)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"arr-{os.getpid()}.npz")
    np.savez(path, x=x, y=labels)
    try:
        counts = prepare(path, "memory://npz-roundtrip", num_shards=2, rows_per_row_group=7, test_fraction=0.2, **quiet)
    finally:
        os.remove(path)
    assert counts == {"train": 40, "test": 10}
    for split in ("train", "test"):
        got = read_all(ParquetDataset(f"memory://npz-roundtrip/{split}", expected_dim=12))
        np.testing.assert_allclose(got.x, x.reshape(50, 12)[got.index].astype(np.float32))
        np.testing.assert_array_equal(got.label, labels[got.index])


def _write_parquet(path, pixels, index=None, metadata=None, column="pixels"):
    flat = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), pixels.shape[1])
    table = pa.table({column: flat, "index": pa.array(np.arange(len(pixels)) if index is None else index)})
    pq.write_table(table.replace_schema_metadata(metadata or {}), path)


def _fail(*args):
    proc = aevb(*args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_prepare_bad_inputs_answer_in_one_line(tmp_path):
    assert "source not found" in _fail("prepare", str(tmp_path / "missing"), str(tmp_path / "o1"))
    fake = tmp_path / "fake.npy"
    fake.write_text("not numpy")
    assert "not a readable .npy/.npz file" in _fail("prepare", str(fake), str(tmp_path / "o2"))
    fake_mat = tmp_path / "fake.mat"
    fake_mat.write_bytes(b"\x00" * 300)
    assert "not a readable MATLAB .mat file" in _fail("prepare", str(fake_mat), str(tmp_path / "o3"))
    not_idx = tmp_path / "idx"
    not_idx.mkdir()
    (not_idx / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    assert "not a readable IDX file" in _fail("prepare", str(not_idx), str(tmp_path / "o4"), "--split", "train")
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 4), np.float32))
    assert "the dataset is empty" in _fail("prepare", str(empty), str(tmp_path / "o5"))
    tiny = tmp_path / "tiny.npy"
    np.save(tiny, np.zeros((1, 4), np.float32))
    assert "too small to split" in _fail("prepare", str(tiny), str(tmp_path / "o5"))
    with_nan = tmp_path / "nan.npy"
    arr = np.random.default_rng(0).random((20, 4))
    arr[3, 1] = np.nan
    np.save(with_nan, arr)
    assert "NaN or inf" in _fail("prepare", str(with_nan), str(tmp_path / "o6"))
    assert "unknown scheme 'ftp://'" in _fail("prepare", str(with_nan), "ftp://host/x")


def test_failed_conversion_leaves_no_partial_output(tmp_path):
    arr = np.random.default_rng(0).random((40, 4))
    arr[-1, 0] = np.inf  # lands in one split only: the other is written first, then removed
    src = tmp_path / "x.npy"
    np.save(src, arr)
    for seed in range(3):
        with pytest.raises(ValueError, match="NaN or inf"):
            prepare(str(src), str(tmp_path / "out"), seed=seed, **quiet)
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]


def test_existing_dataset_needs_overwrite(tmp_path):
    src = tmp_path / "x.npy"
    np.save(src, np.random.default_rng(0).random((20, 4)))
    prepare(str(src), str(tmp_path / "out"), **quiet)
    assert "already holds a dataset; pass --overwrite" in _fail("prepare", str(src), str(tmp_path / "out"))
    np.save(src, np.random.default_rng(1).random((30, 4)))
    assert aevb("prepare", str(src), str(tmp_path / "out"), "--overwrite").returncode == 0
    assert ParquetDataset(str(tmp_path / "out" / "train")).num_rows == 27


def test_reader_rejects_bad_parquet(tmp_path):
    good = np.random.default_rng(0).random((10, 4)).astype(np.float32)
    cases = {
        "nocol": (dict(column="x"), "needs columns 'pixels' and 'index'"),
        "nan": (dict(pixels=np.where(good > 0.9, np.nan, good)), "NaN or inf"),
        "range": (dict(pixels=good * 3), r"values outside the declared range"),
    }
    for name, (kwargs, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        _write_parquet(str(folder / "part-0.parquet"), kwargs.pop("pixels", good), **kwargs)
        with pytest.raises(ValueError, match=message):
            read_all(ParquetDataset(str(folder), expected_dim=4))
    with pytest.raises(ValueError, match="width 4 but the model expects model.input_dim=784"):
        ParquetDataset(str(tmp_path / "range"), expected_dim=784)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no Parquet files found"):
        ParquetDataset(str(tmp_path / "none"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        ParquetDataset(str(tmp_path / "junk"))
    (tmp_path / "zero").mkdir()
    _write_parquet(str(tmp_path / "zero" / "p.parquet"), np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="the dataset is empty"):
        ParquetDataset(str(tmp_path / "zero"))


def test_a_prepared_datasets_root_is_not_one_split_and_is_refused_naming_them(tiny_data, tmp_path):
    """Read as one dataset, the root of `prepare`'s output mixes its train and test examples: an evaluation
    on it would score the training set as "test" with exit status 0."""
    root = tiny_data.rstrip("/")
    with pytest.raises(ValueError) as refused:
        ParquetDataset(root)
    assert str(refused.value) == (
        f"{root} holds the splits train/ and test/ of a prepared dataset, not one split: "
        f"pass {root}/train or {root}/test"
    )
    assert ParquetDataset(f"{root}/test").num_rows == 30  # each split opens as itself
    # A root with one split (prepare --split train) names that one; other subfolders stay one dataset.
    (tmp_path / "only" / "train").mkdir(parents=True)
    (tmp_path / "mine" / "2024").mkdir(parents=True)
    for folder in ("only/train", "mine/2024"):
        _write_parquet(str(tmp_path / folder / "part-0.parquet"), np.random.default_rng(0).random((4, 4)))
    with pytest.raises(
        ValueError, match=r"holds the splits train/ of a prepared dataset, not one split: pass \S+/only/train$"
    ):
        ParquetDataset(str(tmp_path / "only"))
    assert ParquetDataset(str(tmp_path / "mine")).num_rows == 4


@pytest.fixture
def uneven_dataset(tmp_path):
    """Three files of 37, 5 and 58 rows, row groups of 8: uneven on purpose."""
    start = 0
    for i, n in enumerate((37, 5, 58)):
        pixels = np.random.default_rng(i).random((n, 6)).astype(np.float32)
        flat = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 6)
        pq.write_table(
            pa.table({"pixels": flat, "index": pa.array(np.arange(start, start + n))}),
            str(tmp_path / f"part-{i}.parquet"),
            row_group_size=8,
        )
        start += n
    return ParquetDataset(str(tmp_path))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_example_once_per_epoch_and_equal_step_counts(uneven_dataset, world_size):
    streams = [
        EpochStream(uneven_dataset, rank=r, world_size=world_size, batch_size=9, epoch=2, seed=5)
        for r in range(world_size)
    ]
    batches = [list(s) for s in streams]
    assert len({len(b) for b in batches}) == 1  # the same number of steps on every rank
    indices = np.concatenate([b.index for rank in batches for b in rank])
    assert sorted(indices) == list(range(100))


def test_shuffle_is_deterministic_by_seed_and_epoch(uneven_dataset):
    def order(epoch, seed=0):
        return np.concatenate(
            [b.index for b in EpochStream(uneven_dataset, rank=0, world_size=1, batch_size=10, epoch=epoch, seed=seed)]
        )

    assert (order(0) == order(0)).all()
    assert not (order(0) == order(1)).all()
    assert not (order(0) == order(0, seed=1)).all()
    assert not (order(0) == np.arange(100)).all()
    assert assign_row_groups(uneven_dataset.units, 2, seed=0, epoch=0, shuffle=True) == assign_row_groups(
        uneven_dataset.units, 2, seed=0, epoch=0, shuffle=True
    )


def test_resuming_mid_epoch_yields_the_remaining_batches(uneven_dataset):
    kw = dict(rank=1, world_size=2, batch_size=7, epoch=3, seed=1, window=2, binarization="dynamic")
    full = list(EpochStream(uneven_dataset, **kw))
    for start in (0, 1, 4, len(full) - 1, len(full)):
        rest = list(EpochStream(uneven_dataset, start_batch=start, **kw))
        assert len(rest) == len(full) - start
        for a, b in zip(rest, full[start:]):
            np.testing.assert_array_equal(a.index, b.index)
            np.testing.assert_array_equal(a.x, b.x)


def test_binarization_dynamic_static_none(uneven_dataset):
    batch = read_all(uneven_dataset)
    d0 = binarize(batch, "dynamic", seed=0, epoch=0)
    d1 = binarize(batch, "dynamic", seed=0, epoch=1)
    assert set(np.unique(d0.x)) <= {0.0, 1.0}
    assert (d0.x == binarize(batch, "dynamic", seed=0, epoch=0).x).all()
    assert (d0.x != d1.x).mean() > 0.2
    s0, s1 = binarize(batch, "static", seed=0, epoch=0), binarize(batch, "static", seed=0, epoch=7)
    assert (s0.x == s1.x).all()
    assert binarize(batch, "none", seed=0, epoch=0).x is batch.x
    # Bernoulli(intensity): the mean over many epochs approaches the intensities.
    mean = np.mean([binarize(batch, "dynamic", seed=0, epoch=e).x for e in range(400)], axis=0)
    assert np.abs(mean - batch.x).max() < 0.1
    # A pure function of the example: the same pixels whatever batch the example lands in.
    half = binarize(type(batch)(batch.x[50:], batch.index[50:]), "dynamic", seed=0, epoch=0)
    np.testing.assert_array_equal(half.x, d0.x[50:])


def _write_idx(path, array):
    import gzip

    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_idx_folder(tmp_path):
    """Fashion-MNIST ships in MNIST's IDX layout; a small folder made here, and Debian's when installed."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion"
    folder.mkdir()
    images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 30), ("t10k", 10))}
    for prefix, imgs in images.items():
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, len(imgs), dtype=np.uint8))
    assert prepare(str(folder), str(tmp_path / "out"), fmt="fashion-mnist", **quiet) == {"train": 30, "test": 10}
    got = read_all(ParquetDataset(str(tmp_path / "out" / "test")))
    np.testing.assert_allclose(got.x, images["t10k"].reshape(10, 784)[got.index] / 255.0, atol=1e-7)
    truncated = tmp_path / "trunc"
    truncated.mkdir()
    _write_idx(truncated / "train-images-idx3-ubyte.gz", images["train"])
    import gzip

    raw = gzip.open(truncated / "train-images-idx3-ubyte.gz").read()
    with gzip.open(truncated / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(ValueError, match="IDX header says"):
        prepare(str(truncated), str(tmp_path / "out2"), split="train", **quiet)


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_debian_fashion_mnist(tmp_path):
    counts = prepare("/usr/share/datasets/fashion-mnist", str(tmp_path / "f"), fmt="fashion-mnist", **quiet)
    assert counts == {"train": 60_000, "test": 10_000}


def test_byte_binarization_is_bernoulli_of_the_intensity_and_matches_its_definition(mnist_uri):
    from aevb_dist.data.binarization import binarize_bytes, uniform_bits24
    from aevb_dist.data.epoch_stream import to_model_input

    ds = ParquetDataset(f"{mnist_uri}/test")
    raw = ds.read_raw(ds.units[0])
    assert raw.x.dtype == np.uint8 and ds.is_bytes()
    fast = binarize_bytes(raw, "dynamic", seed=4, epoch=2)
    # Its definition: pixel on iff ⌊2²⁴u⌋·255 < v·2²⁴ for the keyed uniform u, i.e. u < v/255.
    from aevb_dist.data.binarization import binarization_key

    z = uniform_bits24(raw.index, 784, binarization_key("dynamic", 4, 2)).astype(np.float64)
    np.testing.assert_array_equal(fast.x, (z / 2**24 < raw.x / 255.0).astype(np.float32))
    assert (to_model_input(ds, raw, "dynamic", seed=4, epoch=2).x == fast.x).all()
    mean = np.mean([binarize_bytes(raw, "dynamic", seed=0, epoch=e).x for e in range(300)], axis=0)
    assert np.abs(mean - raw.x / 255.0).max() < 6 * np.sqrt(0.25 / 300)  # no pixel off by 6 sd
    assert abs(mean.mean() - (raw.x / 255.0).mean()) < 0.001
    assert (binarize_bytes(raw, "dynamic", seed=0, epoch=0).x[raw.x == 0] == 0).all()
    assert (binarize_bytes(raw, "dynamic", seed=0, epoch=0).x[raw.x == 255] == 1).all()


def test_prepare_writes_an_index_that_opens_the_dataset_without_its_footers(tiny_data, monkeypatch):
    from aevb_dist.data.index import INDEX_NAME

    folder = f"{tiny_data}/train"
    from_footers_calls = []
    original = ParquetDataset._add_file
    monkeypatch.setattr(
        ParquetDataset, "_add_file", lambda self, *a: (from_footers_calls.append(a), original(self, *a))
    )
    indexed = ParquetDataset(folder, expected_dim=16)
    assert os.path.exists(f"{folder}/{INDEX_NAME}") and from_footers_calls == []  # no footer read
    again = ParquetDataset(folder, description=indexed.describe())  # a worker given the driver's description
    os.rename(f"{folder}/{INDEX_NAME}", f"{folder}/moved")
    try:
        footers = ParquetDataset(folder, expected_dim=16)
    finally:
        os.rename(f"{folder}/moved", f"{folder}/{INDEX_NAME}")
    assert len(from_footers_calls) == 3  # one per shard without the index
    assert indexed.units == footers.units == again.units and indexed.describe() == footers.describe()
    assert (indexed.shape, indexed.value_range, indexed.has_label) == (
        footers.shape,
        footers.value_range,
        footers.has_label,
    )
    np.testing.assert_array_equal(read_all(indexed).x, read_all(footers).x)
    with pytest.raises(ValueError, match="model.input_dim=17"):
        ParquetDataset(folder, expected_dim=17)


def test_a_stale_or_corrupted_index_is_never_trusted(tmp_path, capsys):
    from aevb_dist.data.index import INDEX_NAME

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 5)).astype(np.float32))
    prepare(str(tmp_path / "x.npy"), str(tmp_path / "pq"), num_shards=2, rows_per_row_group=8, **quiet)
    folder = tmp_path / "pq" / "train"
    extra = next(folder.glob("*.parquet")).read_bytes()
    (folder / "part-99999.parquet").write_bytes(extra)  # a file added after prepare: the index is stale
    stale = ParquetDataset(str(folder))
    assert "lists other files than the folder holds" in capsys.readouterr().err
    assert stale.num_rows == 36 + 18  # the 36 training rows and the added copy of an 18-row shard
    (folder / "part-99999.parquet").unlink()
    index = folder / INDEX_NAME
    index.write_bytes(index.read_bytes().replace(b'"dim": 5', b'"dim": 6'))
    with pytest.raises(ValueError, match="does not match its checksum"):
        ParquetDataset(str(folder))


def test_byte_binarization_equals_its_definition_for_every_byte_value():
    """binarize_bytes compares ⌊255·u24 / 2²⁴⌋ < v instead of u24 < ⌈v·2²⁴/255⌉ (equivalent for every
    integer u24 < 2²⁴, binarization.py says why): the definition's bit for each of the 256 byte values,
    each against ~6,300 hashes."""
    from aevb_dist.data.binarization import binarization_key, binarize_bytes, uniform_bits24
    from aevb_dist.data.schema import Batch

    index = np.arange(2048, dtype=np.int64) * 7919 + 3
    values = np.broadcast_to((np.arange(2048 * 784) % 256).astype(np.uint8).reshape(2048, 784), (2048, 784))
    fast = binarize_bytes(Batch(np.ascontiguousarray(values), index), "static", seed=11, epoch=0).x
    u24 = uniform_bits24(index, 784, binarization_key("static", 11, 0)).astype(np.float64)
    np.testing.assert_array_equal(fast, (u24 / 2**24 < values / 255.0).astype(np.float32))
    assert fast[values == 0].max() == 0 and fast[values == 255].min() == 1


def test_local_files_load_in_line_remote_ones_one_window_ahead(uneven_dataset, s3_endpoint):
    """prefetch.py: a stream from local files starts no reader thread (the training thread reads as it
    needs); from S3 one thread loads the next window. Both yield the same batches, bits and order;
    `read_ahead` (data.read_ahead) overrides the rule."""
    import threading

    import fsspec

    s3 = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    for unit in {u.path for u in uneven_dataset.units}:
        s3.put(unit, f"aevb-test/uneven/{os.path.basename(unit)}")
    remote = ParquetDataset("s3://aevb-test/uneven", endpoint_url=s3_endpoint)
    kw = dict(rank=0, world_size=1, batch_size=7, epoch=1, seed=2, window=2, binarization="dynamic")

    def batches_and_reader_threads(dataset, read_ahead=None):
        out, threads = [], set()
        for batch in EpochStream(dataset, read_ahead=read_ahead, **kw):
            out.append(batch)
            threads |= {t.name for t in threading.enumerate() if t.name.startswith("aevb-read")}
        return out, threads

    local, local_threads = batches_and_reader_threads(uneven_dataset)
    from_s3, s3_threads = batches_and_reader_threads(remote)
    assert not local_threads and s3_threads
    # data.read_ahead overrides the storage rule either way (the trainer sets it on a GPU).
    assert batches_and_reader_threads(uneven_dataset, read_ahead=True)[1]
    assert not batches_and_reader_threads(remote, read_ahead=False)[1]
    assert len(local) == len(from_s3) == 15
    for a, b in zip(local, from_s3):
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.x, b.x)


def test_row_groups_read_once_are_kept_decoded_within_the_budget(uneven_dataset, tmp_path):
    """data/decoded_cache.py: with room for every row group, the second epoch reads nothing from storage (the
    files are gone, and it still yields) and yields exactly what a dataset without the cache yields; with room
    for a few, those are kept and the rest must be read again; kept arrays cannot be written into."""
    import shutil

    source = os.path.dirname(uneven_dataset.units[0].path)
    kw = dict(rank=0, world_size=1, batch_size=7, seed=2, window=2, binarization="dynamic")

    def epoch(dataset, e):
        return list(EpochStream(dataset, epoch=e, **kw))

    shutil.copytree(source, tmp_path / "all")
    cached = ParquetDataset(str(tmp_path / "all"), cache_bytes=1 << 20)
    first = epoch(cached, 0)
    assert len(cached.decoded) == len(cached.units) == 14
    shutil.rmtree(tmp_path / "all")
    again = epoch(cached, 1)
    for a, b in zip(again, epoch(uneven_dataset, 1), strict=True):  # uneven_dataset: no cache
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.x, b.x)
    assert [len(b) for b in first] == [len(b) for b in again]
    held = cached.read_raw(cached.units[0])
    with pytest.raises(ValueError, match="read-only"):
        held.x[0] = 0.5
    with pytest.raises(ValueError, match="read-only"):
        held.index[0] = 7

    shutil.copytree(source, tmp_path / "some")
    budget = 3 * (8 * 6 * 4 + 8 * 8)  # three full row groups of 8 rows (6 float32 pixels, an int64 index)
    partial = ParquetDataset(str(tmp_path / "some"), cache_bytes=budget)
    epoch(partial, 0)
    assert 3 <= len(partial.decoded) < len(partial.units) and partial.decoded.used_bytes <= budget
    shutil.rmtree(tmp_path / "some")
    with pytest.raises((FileNotFoundError, ValueError)):
        epoch(partial, 1)  # what did not fit is read from storage again


def test_training_sets_get_the_configured_cache_and_test_sets_none(tiny_data):
    from aevb_dist.config import load_config
    from aevb_dist.train.datasets import open_datasets
    from tests.helpers import SMOKE, tiny_overrides

    overrides = tiny_overrides(tiny_data, "unused")
    train, test = open_datasets(load_config(SMOKE, overrides))
    assert train.decoded.budget_bytes == 512 << 20 and test.decoded.budget_bytes == 0
    train, _ = open_datasets(load_config(SMOKE, overrides + ["data.decoded_cache_mib=3"]))
    assert train.decoded.budget_bytes == 3 << 20
    # data.cache_on_device holds the set on the device: no second copy in host memory.
    train, _ = open_datasets(load_config(SMOKE, overrides + ["data.cache_on_device=true"]))
    assert train.decoded.budget_bytes == 0
    with pytest.raises(ValueError, match="data.decoded_cache_mib=-1 must be >= 0"):
        load_config(SMOKE, overrides + ["data.decoded_cache_mib=-1"])
