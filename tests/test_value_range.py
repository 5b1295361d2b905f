"""The pixels' value range is never guessed silently: `prepare` tells it from the data or is told it, says
what it recorded, and refuses what it cannot tell; a Bernoulli model on data recorded in the wrong range
is refused before it trains or scores."""

import numpy as np
import pytest

from aevb_dist.config import load_config
from aevb_dist.data.prepare import prepare
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.eval.jobs import evaluate
from aevb_dist.train.driver import train
from tests.helpers import SMOKE, aevb, tiny_overrides


def _prepare(tmp_path, pixels: np.ndarray, name: str, **kwargs) -> tuple[str, list[str]]:
    np.save(tmp_path / f"{name}.npy", pixels)
    said: list[str] = []
    prepare(
        str(tmp_path / f"{name}.npy"),
        str(tmp_path / name),
        num_shards=2,
        rows_per_row_group=16,
        report=said.append,
        **kwargs,
    )
    return str(tmp_path / name), said


def _binary(n=200, d=16) -> np.ndarray:
    return (np.random.default_rng(0).random((n, d)) < 0.3).astype(np.uint8)


def test_0_1_bytes_are_recorded_as_binary_and_read_as_0_and_1(tmp_path):
    """Binarized MNIST as it is usually shipped: uint8 0/1. Taken as 8-bit, every "on" pixel was 1/255."""
    pixels = _binary()
    out, said = _prepare(tmp_path, pixels, "binary")
    assert any(
        "pixel values in [0, 1] are mapped to [0, 1]: every value is 0 or 1 (binary data)" in line for line in said
    ), said
    data = ParquetDataset(f"{out}/train")
    assert data.value_range == (0.0, 1.0)
    batch = data.read_raw(data.units[0])
    intensities = data.to_unit_interval(batch.x)
    assert set(np.unique(intensities)) == {0.0, 1.0}
    np.testing.assert_array_equal(intensities, pixels[batch.index].astype(np.float32))
    _, said = _prepare(tmp_path, (pixels * 200).astype(np.uint8), "bytes")  # real 8-bit data stays 8-bit
    assert any("pixel values in [0, 255] are mapped to [0, 1]: uint8 values, read as 8-bit" in line for line in said), (
        said
    )


def test_floats_outside_the_unit_interval_take_their_own_extremes_and_say_how_to_give_another(tmp_path):
    """scikit-learn's digits: float pixels 0..16. Their range is the data's own, said in plain words."""
    pixels = np.random.default_rng(3).integers(0, 17, size=(100, 16)).astype(np.float32)
    pixels[0, :2] = 0, 16
    out, said = _prepare(tmp_path, pixels, "floats")
    line = next(line for line in said if "are mapped to [0, 1]" in line)
    assert line.startswith("prepare: pixel values in [0, 16] are mapped to [0, 1]: the data's own minimum and maximum")
    assert "--value-range LO HI" in line and line.count("(") == line.count(")") <= 1
    assert ParquetDataset(f"{out}/train").value_range == (0.0, 16.0)


def test_integers_whose_full_scale_cannot_be_told_are_refused_unless_declared(tmp_path):
    sixteen_bit = np.random.default_rng(1).integers(0, 4000, size=(100, 16)).astype(np.uint16)
    sixteen_bit[0, :2] = 0, 3999
    with pytest.raises(
        ValueError, match=r"uint16 pixels in \[0, 3999\]: their full scale cannot be told .*--value-range"
    ):
        _prepare(tmp_path, sixteen_bit, "guess")
    assert not (tmp_path / "guess").exists()  # nothing left behind
    out, said = _prepare(tmp_path, sixteen_bit, "declared", value_range=(0, 65535))
    assert any("pixel values in [0, 65535] are mapped to [0, 1]: as given by --value-range" in line for line in said)
    assert ParquetDataset(f"{out}/train").value_range == (0.0, 65535.0)
    with pytest.raises(ValueError, match=r"values in \[0, 3999\] fall outside --value-range 0 1000"):
        _prepare(tmp_path, sixteen_bit, "too-narrow", value_range=(0, 1000))
    with pytest.raises(ValueError, match="LO must be less than HI"):
        _prepare(tmp_path, sixteen_bit, "backwards", value_range=(10, 0))


def test_the_command_line_takes_value_range_and_refuses_in_one_line(tmp_path):
    ints = np.random.default_rng(2).integers(0, 900, size=(60, 8)).astype(np.int64)
    ints[0, :2] = 0, 899
    np.save(tmp_path / "ints.npy", ints)
    refused = aevb("prepare", str(tmp_path / "ints.npy"), str(tmp_path / "refused"), timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "int64 pixels in [0, 899]" in refused.stderr and not (tmp_path / "refused").exists()
    done = aevb("prepare", str(tmp_path / "ints.npy"), str(tmp_path / "ok"), "--value-range", "0", "1023", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pixel values in [0, 1023] are mapped to [0, 1]: as given by --value-range" in done.stderr


def test_a_bernoulli_model_on_data_recorded_in_the_wrong_range_is_refused_before_training(tmp_path):
    """0/1 bytes declared 8-bit by hand: every pixel ≤ 1/255 of its range. Training (and evaluate, which
    runs the same check) stops in one line instead of learning that every pixel is off."""
    out, _ = _prepare(tmp_path, _binary(), "wrong", value_range=(0, 255))
    cfg = load_config(SMOKE, tiny_overrides(out, str(tmp_path / "runs")))
    with pytest.raises(ValueError, match=r"no pixel reaches 0.0156 of the recorded value range \[0, 255\]"):
        train(cfg)
    right, _ = _prepare(tmp_path, _binary(), "right")
    assert (
        train(
            load_config(
                SMOKE,
                tiny_overrides(
                    right,
                    str(tmp_path / "runs"),
                    **{"ray.local_mode": "true", "train.num_workers": 1, "train.max_steps": 2},
                ),
            )
        )["step"]
        == 2
    )
    with pytest.raises(ValueError, match="no pixel reaches"):  # before any Ray task starts
        evaluate(str(tmp_path / "runs" / "smoke"), f"{out}/test", num_importance_samples=2)
