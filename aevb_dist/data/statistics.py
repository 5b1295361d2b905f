"""Statistics of a dataset that a run's model starts from, read once on the driver."""

from __future__ import annotations

import numpy as np


def mean_intensity(dataset) -> np.ndarray:
    """Each pixel's mean over every training row, as intensities in [0, 1] (the stored values scaled by the
    dataset's recorded range, as the reader scales them), float64 [D]."""
    total, count = np.zeros(dataset.dim, np.float64), 0
    for unit in dataset.units:
        raw = dataset.read_raw(unit)
        total += dataset.to_unit_interval(raw.x).sum(axis=0, dtype=np.float64)
        count += len(raw)
    if count == 0:
        raise ValueError("model.output_bias_init=data_mean: the training set has no rows")
    return total / count
