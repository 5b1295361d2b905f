"""`aevb-dist prepare` from images of your own: a folder of PNG/JPEG files (a subfolder per class, or flat)
and Parquet with encoded image bytes in the Hugging Face layout. The pixels arrive unchanged; what cannot
be converted is one line naming the file, and nothing is left behind."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aevb_dist.data.images import ImageOptions
from aevb_dist.data.prepare import prepare
from aevb_dist.data.reader import ParquetDataset
from tests.helpers import aevb


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _color(rng, n, h=5, w=4) -> np.ndarray:
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _all_rows(out: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, ParquetDataset]:
    """Both splits' stored pixels, source positions and labels, in source order."""
    xs, idx, labels = [], [], []
    for split in ("train", "test"):
        data = ParquetDataset(f"{out}/{split}")
        for unit in data.units:
            batch = data.read_raw(unit)
            xs.append(batch.x), idx.append(batch.index), labels.append(batch.label)
    order = np.argsort(np.concatenate(idx))
    return (
        np.concatenate(xs)[order],
        np.concatenate(idx)[order],
        np.concatenate(labels)[order] if labels[0] is not None else None,
        data,
    )


def test_a_class_per_folder_tree_keeps_pixels_labels_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    images = _color(rng, 12)
    for i, image in enumerate(images):  # classes "cat" (first 7) and "dog", files in sorted order
        folder = tmp_path / "photos" / ("cat" if i < 7 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.png").write_bytes(_png(image))
    said = []
    prepare(
        str(tmp_path / "photos"),
        str(tmp_path / "out"),
        fmt="imagefolder",
        num_shards=1,
        test_fraction=0.25,
        report=said.append,
    )
    x, _, labels, data = _all_rows(str(tmp_path / "out"))
    assert data.shape == [3, 5, 4]  # channels first
    np.testing.assert_array_equal(x.reshape(12, 3, 5, 4), images.transpose(0, 3, 1, 2))  # lossless: unchanged
    np.testing.assert_array_equal(labels, [0] * 7 + [1] * 5)
    index = json.loads((tmp_path / "out" / "train" / "_index.json").read_text())
    assert index["label_names"] == ["cat", "dog"]
    metadata = pq.read_schema(tmp_path / "out" / "train" / "part-00000.parquet").metadata
    assert json.loads(metadata[b"aevb.label_names"]) == ["cat", "dog"]
    assert any("decoded 12/12 images" in line for line in said) and any("8-bit" in line for line in said)


def test_a_flat_folder_of_gray_jpegs_mixed_sizes_and_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        gray = rng.integers(0, 256, size=(8, 8 if i else 12), dtype=np.uint8)  # the first one wider
        Image.fromarray(gray).save(flat / f"{i}.jpg", quality=95)
    with pytest.raises(ValueError, match=r"images of different sizes: .*0.jpg is 8×12, .*1.jpg is 8×8; pass --size"):
        prepare(str(flat), str(tmp_path / "mixed"), fmt="imagefolder", report=lambda m: None)
    assert not (tmp_path / "mixed").exists()
    prepare(
        str(flat),
        str(tmp_path / "sized"),
        fmt="imagefolder",
        num_shards=1,
        test_fraction=0.2,
        image_options=ImageOptions(size=(4, 4)),
        report=lambda m: None,
    )
    data = ParquetDataset(str(tmp_path / "sized" / "train"))
    assert data.shape == [4, 4] and not data.has_label  # gray JPEGs: one channel; a flat folder: no labels
    (flat / "5.jpg").write_bytes((flat / "5.jpg").read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match=r"5.jpg: not a readable image .*pass --skip-bad"):
        prepare(
            str(flat),
            str(tmp_path / "bad"),
            fmt="imagefolder",
            image_options=ImageOptions(size=(4, 4)),
            report=lambda m: None,
        )
    assert not (tmp_path / "bad").exists()  # nothing left behind
    said = []
    counts = prepare(
        str(flat),
        str(tmp_path / "skipped"),
        fmt="imagefolder",
        test_fraction=0.2,
        image_options=ImageOptions(size=(4, 4), skip_bad=True),
        report=said.append,
    )
    assert sum(counts.values()) == 5 and any("skipped 1 unreadable image(s), e.g. " in line for line in said)
    (tmp_path / "empty").mkdir()
    done = aevb("prepare", str(tmp_path / "empty"), str(tmp_path / "none"), "--format", "imagefolder", timeout=120)
    assert done.returncode == 2 and "no PNG or JPEG files" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "none").exists()


def test_parquet_with_encoded_images_in_the_hugging_face_layout(tmp_path):
    rng = np.random.default_rng(2)
    images = _color(rng, 10, 6, 6)
    struct = pa.array(
        [{"bytes": _png(im), "path": f"img{i}.png"} for i, im in enumerate(images)],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": struct, "label": pa.array(np.arange(10) % 3)}), tmp_path / "hf.parquet")
    prepare(
        str(tmp_path / "hf.parquet"), str(tmp_path / "out"), num_shards=1, test_fraction=0.2, report=lambda m: None
    )  # the format from the name
    x, _, labels, data = _all_rows(str(tmp_path / "out"))
    np.testing.assert_array_equal(x.reshape(10, 3, 6, 6), images.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(labels, np.arange(10) % 3)
    plain = pa.table({"png": pa.array([_png(im) for im in images], type=pa.binary()), "y": pa.array(np.arange(10))})
    pq.write_table(plain, tmp_path / "plain.parquet")
    prepare(
        str(tmp_path / "plain.parquet"),
        str(tmp_path / "plain"),
        num_shards=1,
        test_fraction=0.2,
        image_options=ImageOptions(image_column="png", label_column="y"),
        report=lambda m: None,
    )
    x, _, labels, _ = _all_rows(str(tmp_path / "plain"))
    np.testing.assert_array_equal(labels, np.arange(10))
    pq.write_table(pa.table({"image": pa.array([b"not an image"] * 3)}), tmp_path / "junk.parquet")
    with pytest.raises(ValueError, match=r"junk.parquet row 0: not a readable image"):
        prepare(str(tmp_path / "junk.parquet"), str(tmp_path / "junk"), report=lambda m: None)
    pq.write_table(pa.table({"image": pa.array([1.0, 2.0])}), tmp_path / "floats.parquet")
    with pytest.raises(ValueError, match=r"column 'image' holds double, not encoded image bytes"):
        prepare(str(tmp_path / "floats.parquet"), str(tmp_path / "floats"), report=lambda m: None)
    with pytest.raises(ValueError, match=r"no image column 'photo'; pass --image-column \(columns: image, label\)"):
        prepare(
            str(tmp_path / "hf.parquet"),
            str(tmp_path / "missing"),
            image_options=ImageOptions(image_column="photo"),
            report=lambda m: None,
        )


def _hf_parquet(folder, images: np.ndarray, files: int = 2, column: str = "image") -> None:
    """Hugging Face's layout: struct {bytes, path} images and a label column, in `files` files."""
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in enumerate(np.array_split(np.arange(len(images)), files)):
        struct = pa.array(
            [{"bytes": _png(images[i]), "path": f"{i}.png"} for i in rows],
            type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
        pq.write_table(
            pa.table({column: struct, "label": pa.array(rows % 5)}),
            folder / f"train-{part:05d}.parquet",
            row_group_size=8,
        )


def test_training_streams_parquet_of_encoded_images_without_converting_it(tmp_path):
    """The reader decodes the images as it reads each row group: the same
    pixels, in the same order, as the dataset `prepare` converts from the same files."""
    from aevb_dist.config import load_config
    from aevb_dist.train.driver import train
    from tests.helpers import SMOKE, tiny_overrides

    images = _color(np.random.default_rng(3), 40, 4, 6)
    _hf_parquet(tmp_path / "hf", images)
    streamed = ParquetDataset(str(tmp_path / "hf"))
    assert streamed.shape == [3, 4, 6] and streamed.value_range == (0.0, 255.0) and streamed.num_rows == 40
    x = np.concatenate([streamed.read_raw(u).x for u in streamed.units])
    index = np.concatenate([streamed.read_raw(u).index for u in streamed.units])
    np.testing.assert_array_equal(index, np.arange(40))
    np.testing.assert_array_equal(x.reshape(40, 3, 4, 6), images.transpose(0, 3, 1, 2))
    worker_view = ParquetDataset(str(tmp_path / "hf"), description=streamed.describe())  # what a worker opens
    np.testing.assert_array_equal(worker_view.read_raw(worker_view.units[3]).x, streamed.read_raw(streamed.units[3]).x)
    last = train(
        load_config(
            SMOKE,
            tiny_overrides(
                str(tmp_path),
                str(tmp_path / "runs"),
                **{
                    "data.train_uri": str(tmp_path / "hf"),
                    "data.test_uri": "null",
                    "model.input_dim": 72,
                    "model.likelihood": "discretized_logistic",
                    "model.architecture": "conv",
                    "model.conv_channels": "[4]",
                    "ray.local_mode": "true",
                    "train.num_workers": 2,
                    "train.max_steps": 4,
                },
            ),
        )
    )
    assert last["step"] == 4 and np.isfinite(last["train_elbo"])
    odd = images.copy()
    _hf_parquet(tmp_path / "odd", odd)
    table = pq.read_table(tmp_path / "odd" / "train-00001.parquet")
    wrong = pa.array(
        [{"bytes": _png(np.zeros((5, 6, 3), np.uint8)), "path": "x.png"}] * table.num_rows,
        type=table.column("image").type,
    )
    pq.write_table(table.set_column(0, "image", wrong), tmp_path / "odd" / "train-00001.parquet")
    with pytest.raises(
        ValueError,
        match=r"train-00001.parquet row group 0 row 0: an image of shape \[3, 5, 6\], "
        r"the dataset's is \[3, 4, 6\]",
    ):
        data = ParquetDataset(str(tmp_path / "odd"))
        [data.read_raw(u) for u in data.units]


def test_encoded_images_are_decoded_one_window_ahead_in_a_thread_even_from_local_files(tmp_path):
    """data/prefetch.py: decoding PNG/JPEG is the heavy part of streaming such a dataset, so it runs in the
    reader's thread by default wherever the files are (plain local Parquet is read in line)."""
    import threading

    from aevb_dist.data.epoch_stream import EpochStream

    _hf_parquet(tmp_path / "hf", _color(np.random.default_rng(5), 24, 4, 6))
    dataset = ParquetDataset(str(tmp_path / "hf"))
    seen = set()
    rows = 0
    for batch in EpochStream(dataset, rank=0, world_size=1, batch_size=5, epoch=0, seed=0, window=1):
        rows += len(batch)
        seen |= {t.name for t in threading.enumerate() if t.name.startswith("aevb-read")}
    assert rows == 24 and seen


@pytest.mark.slow
def test_a_run_on_encoded_images_is_evaluated_and_encoded_under_its_own_column_name(tmp_path):
    """A run trained with data.image_column=img: evaluate and encode read the images from that column (the
    run's config says it; the tasks open the driver's description of the dataset)."""
    from aevb_dist.config import load_config
    from aevb_dist.eval.jobs import encode, evaluate
    from aevb_dist.train.driver import train
    from tests.helpers import SMOKE, tiny_overrides

    _hf_parquet(tmp_path / "hf", _color(np.random.default_rng(4), 32, 4, 6), column="img")
    train(
        load_config(
            SMOKE,
            tiny_overrides(
                str(tmp_path),
                str(tmp_path / "runs"),
                **{
                    "data.train_uri": str(tmp_path / "hf"),
                    "data.test_uri": "null",
                    "data.image_column": "img",
                    "model.input_dim": 72,
                    "model.likelihood": "discretized_logistic",
                    "model.architecture": "conv",
                    "model.conv_channels": "[4]",
                    "ray.local_mode": "true",
                    "train.num_workers": 1,
                    "train.max_steps": 3,
                    "run.name": "encoded",
                },
            ),
        )
    )
    run = str(tmp_path / "runs" / "encoded")
    result = evaluate(run, str(tmp_path / "hf"), num_importance_samples=4, num_workers=2)
    assert result["num_examples"] == 32 and 0 < result["log_marginal_likelihood_bits_per_dim"] < 9
    assert encode(run, str(tmp_path / "hf"), str(tmp_path / "codes"), num_workers=1) == 32
