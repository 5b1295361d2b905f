"""Reading the counts layout of `schema.py`: a file's footer (its features and covariates, checked against
their checksum) and a row group's list columns as sparse rows, checked. pyarrow and NumPy, no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from aevb_dist.data.schema import (
    COUNT_INDICES,
    COUNT_VALUES,
    INDEX,
    META_CHECKSUM,
    META_COVARIATES,
    META_FEATURE_NAMES,
    META_RANGE,
    META_SHAPE,
    features_digest,
    metadata_checksum,
)
from aevb_dist.data.sparse_rows import CsrRows


@dataclass(frozen=True)
class CountsFooter:
    dim: int  # features (genes)
    features_sha256: str  # of the feature names as written: two datasets of the same genes have the same
    covariates: dict  # column → its category names


def read_counts_footer(path: str, schema: pa.Schema) -> CountsFooter:
    missing = [c for c in (COUNT_VALUES, INDEX) if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: a file of counts needs columns {', '.join(missing)} too")
    md = schema.metadata or {}
    parts = [md.get(k, b"") for k in (META_SHAPE, META_RANGE, META_FEATURE_NAMES, META_COVARIATES)]
    if md.get(META_CHECKSUM) != metadata_checksum(*parts):
        raise ValueError(
            f"{path}: its metadata (features, covariates) does not match its checksum: the file is corrupted; "
            "prepare it again"
        )
    return CountsFooter(json.loads(parts[0])[0], features_digest(parts[2]), json.loads(parts[3] or b"{}"))


def sparse_rows_of(table: pa.Table, dim: int, where: str) -> CsrRows:
    """A row group's counts as sparse rows, checked: entries within the `dim` features, counts non-negative."""
    indices, values = (table.column(c).combine_chunks() for c in (COUNT_INDICES, COUNT_VALUES))
    offsets = indices.offsets.to_numpy().astype(np.int64)
    if indices.null_count or values.null_count or not np.array_equal(offsets, values.offsets.to_numpy()):
        raise ValueError(f"{where}: {COUNT_INDICES} and {COUNT_VALUES} differ in length or hold nulls")
    rows = CsrRows(
        offsets - offsets[0],
        indices.flatten().to_numpy().astype(np.int32, copy=False),
        values.flatten().to_numpy().astype(np.float32),
        dim,
    )
    if rows.indices.size and (rows.indices.min() < 0 or rows.indices.max() >= dim):
        raise ValueError(f"{where}: a count's feature lies outside the dataset's {dim} features")
    if rows.values.size and rows.values.min() < 0:
        raise ValueError(f"{where}: negative counts")
    return rows
