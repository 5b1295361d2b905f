"""Corrupted shards are a clear error naming the file (and the row group), never wrong pixels or a crash."""

import numpy as np
import pytest

from aevb_dist.data.prepare import prepare
from aevb_dist.data.reader import ParquetDataset

ROWS, DIM = 120, 64


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """One shard of 90 uint8 images in row groups of 30, and its bytes."""
    folder = tmp_path_factory.mktemp("corrupt")
    pixels = np.random.default_rng(0).integers(0, 256, (ROWS, DIM), dtype=np.uint8)
    np.savez(folder / "x.npz", x=pixels, y=np.arange(ROWS) % 10)
    prepare(
        str(folder / "x.npz"),
        str(folder / "pq"),
        num_shards=1,
        split="train",
        rows_per_row_group=30,
        test_fraction=0.25,
        report=lambda m: None,
    )
    path = next((folder / "pq" / "train").glob("*.parquet"))
    return path, path.read_bytes()


def read_everything(folder: str) -> dict[int, np.ndarray]:
    dataset = ParquetDataset(folder)
    out = {}
    for unit in dataset.units:
        batch = dataset.read_raw(unit)
        out.update(zip(batch.index.tolist(), batch.x))
    return out


@pytest.mark.parametrize("region", ["footer", "page headers and data"])
@pytest.mark.parametrize("seed", range(8))
def test_a_flipped_byte_is_an_error_naming_the_file_or_changes_nothing(shard, tmp_path, region, seed):
    path, original = shard
    reference = read_everything(str(path.parent))
    rng = np.random.default_rng(seed)
    data = bytearray(original)
    footer_length = int.from_bytes(original[-8:-4], "little")
    lo, hi = (
        (len(data) - 8 - footer_length, len(data) - 8) if region == "footer" else (4, len(data) - 8 - footer_length)
    )
    for offset in rng.integers(lo, hi, 3):
        data[offset] ^= 1 << int(rng.integers(0, 8))
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / path.name).write_bytes(bytes(data))
    try:
        got = read_everything(str(folder))
    except ValueError as err:
        message = str(err)
        assert path.name in message and "\n" not in message.strip(), message
        if region != "footer" and "row group" not in message:
            assert "not a readable Parquet file" in message, message
        return
    # Read without an error: then it must be exactly the data written (the flip hit nothing that is read).
    assert got.keys() == reference.keys()
    assert all(np.array_equal(got[i], reference[i]) for i in reference)
