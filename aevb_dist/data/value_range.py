"""The value range of a dataset's pixels: the range the reader maps to [0, 1]. `prepare` decides it once,
from the data or from the user's `--value-range`, records it in the dataset and says what it chose; it is
never guessed silently. (Found: binarized MNIST shipped as uint8 0/1, taken as 8-bit, made every "on" pixel
1/255, and a model trained on MNIST then scored a record-looking −27 nats on it.)
"""

from __future__ import annotations

from typing import Optional

import numpy as np

# A Bernoulli model reads intensities as probabilities: data none of whose pixels reaches this share of its
# recorded range is almost certainly recorded in the wrong range (0/1 data taken as 8-bit reaches 1/255).
NEARLY_BLANK = 1.0 / 64


def decide_value_range(
    arrays: list[np.ndarray], where: str, declared: Optional[tuple[float, float]] = None
) -> tuple[float, float, str]:
    """(lo, hi, why) for pixels `arrays` (all splits of one dataset, so that they share one range); `why` is
    what `prepare` says after "pixel values in [lo, hi] are mapped to [0, 1]: "."""
    arrays = [a for a in arrays if a.size]
    if not arrays:
        raise ValueError(f"{where}: the dataset is empty")
    dtype = arrays[0].dtype
    if dtype.kind not in "biuf":
        raise ValueError(f"{where}: pixels must be numbers, got dtype {dtype}")
    if dtype.kind == "f" and not all(np.isfinite(a).all() for a in arrays):
        raise ValueError(f"{where}: the data contain NaN or inf values")
    lo = float(min(a.min() for a in arrays))
    hi = float(max(a.max() for a in arrays))
    if declared is not None:
        return _declared(declared, lo, hi, where)
    if dtype.kind in "biu":
        if lo < 0:
            raise ValueError(f"{where}: integer pixels must be >= 0, found {lo:g}; pass --value-range LO HI")
        if hi <= 1:
            return 0.0, 1.0, "every value is 0 or 1 (binary data)"
        if dtype == np.uint8:
            return 0.0, 255.0, "uint8 values, read as 8-bit"
        raise ValueError(
            f"{where}: {dtype} pixels in [{lo:g}, {hi:g}]: their full scale cannot be told from the "
            f"data; pass --value-range LO HI (e.g. --value-range 0 65535 for 16-bit images)"
        )
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0, "float values, already within [0, 1]"
    if hi == lo:
        raise ValueError(f"{where}: every value equals {lo:g}; nothing to learn")
    return (
        lo,
        hi,
        (
            "the data's own minimum and maximum, as its float values fall outside [0, 1]. If their full scale is "
            "another, prepare again with --value-range LO HI"
        ),
    )


def _declared(declared: tuple[float, float], lo: float, hi: float, where: str) -> tuple[float, float, str]:
    low, high = float(declared[0]), float(declared[1])
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"--value-range {low:g} {high:g}: LO must be less than HI")
    if lo < low or hi > high:
        raise ValueError(f"{where}: values in [{lo:g}, {hi:g}] fall outside --value-range {low:g} {high:g}")
    return low, high, "as given by --value-range"


def check_range_fits(value_range, brightest: Optional[float], likelihood: str, where: str) -> None:
    """One line for data the likelihood would misread: a discretized logistic (256 levels) on data that is
    not recorded as 8-bit (`value_range`), or a Bernoulli model on data whose `brightest` pixel in the first
    row group (after mapping the recorded range to [0, 1]; None where not read) is nearly 0, so that every
    pixel reads as almost surely off."""
    lo, hi = value_range
    if likelihood == "discretized_logistic" and (lo, hi) != (0.0, 255.0):
        raise ValueError(
            f"model.likelihood=discretized_logistic models 8-bit pixels (256 levels); {where} is "
            f"recorded with the value range [{lo:g}, {hi:g}]"
        )
    if likelihood != "bernoulli" or brightest is None or brightest >= NEARLY_BLANK:
        return
    raise ValueError(
        f"{where}: no pixel reaches {NEARLY_BLANK:.3g} of the recorded value range [{lo:g}, {hi:g}] "
        f"(brightest: {brightest:.3g}); a Bernoulli model would read every pixel as off. "
        "Was 0/1 data prepared as 8-bit? Prepare it again (0/1 data is recorded as binary now, or "
        "pass --value-range)"
    )
