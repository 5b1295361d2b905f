"""Readers of count matrices for `aevb-dist prepare`: AnnData (.h5ad), a Cell Ranger output folder (10x) and
a scipy.sparse matrix (.npz). Each gives its cells (rows) in chunks as CSR, with the genes' names and the
cells' annotations (obs) that `prepare` is asked to keep.

An .h5ad is read backed, a chunk of rows at a time, from X or any layer (dense or CSR): a file larger than
memory converts. A 10x matrix and an .npz are read whole (their formats store entries in no row order).
`anndata` and `h5py` come with `pip install "aevb-dist[singlecell]"`.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

TENX_FILES = ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz")


@dataclass
class Categorical:
    """A column of cell annotations as codes into its category names (codes −1 where missing)."""

    codes: np.ndarray  # [N] int32
    categories: list[str]


@dataclass
class CountMatrix:
    """Cells × features counts, read in chunks of rows."""

    where: str  # the file and layer, as messages name them
    num_rows: int
    feature_names: list[str]
    obs: dict = field(default_factory=dict)  # column → values (any pandas-convertible), for the keys asked for
    _reader: object = None  # rows(start, stop) → scipy.sparse.csr_matrix

    def chunks(self, rows_per_chunk: int) -> Iterator[tuple[int, "object"]]:
        """(first row, CSR of the next rows) over the whole matrix, each checked to hold counts."""
        for start in range(0, self.num_rows, rows_per_chunk):
            chunk = self._reader(start, min(start + rows_per_chunk, self.num_rows))
            check_counts(chunk, self.where, start)
            yield start, chunk


def check_counts(chunk, where: str, first_row: int) -> None:
    """A count matrix holds non-negative integers: anything else (normalized or log values) is refused in one line."""
    values = chunk.data
    # Stored as int32: a count beyond it (none is, in any assay) would wrap silently.
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values)) | (values > np.iinfo(np.int32).max)
    if bad.any():
        entry = int(np.flatnonzero(bad)[0])
        row = first_row + int(np.searchsorted(chunk.indptr, entry, side="right")) - 1
        raise ValueError(
            f"{where} holds {values[entry]!r} at row {row}: counts must be non-negative integers below 2³¹ "
            "(raw counts, not normalized or log values; with an .h5ad, name the layer of raw counts with --layer)"
        )


def categorical(values, name: str, where: str) -> Categorical:
    """An obs column as codes and category names (in the column's own order where it is categorical)."""
    import pandas as pd

    column = values if isinstance(values, pd.Series) else pd.Series(values)
    cat = column.astype("category")
    if len(cat.cat.categories) > 2**31 - 1:
        raise ValueError(f"{where}: obs column {name!r} has too many categories")
    return Categorical(cat.cat.codes.to_numpy().astype(np.int32), [str(c) for c in cat.cat.categories])


def read_h5ad(path: str, layer: Optional[str], keys: list[str]) -> CountMatrix:
    import h5py
    from anndata.io import read_elem, sparse_dataset

    f = h5py.File(path, "r")
    name = "X" if layer is None else f"layers/{layer}"
    where = f"{path}: {'X' if layer is None else f'layer {layer!r}'}"
    if name not in f:
        held = sorted(f["layers"].keys()) if "layers" in f else []
        raise ValueError(f"{path} has no layer {layer!r} (its layers: {', '.join(held) or 'none'})")
    # Only the obs columns asked for: an atlas's obs holds dozens of columns of millions of cells.
    _check_keys(keys, list(f["obs"].attrs.get("column-order", [])), path)
    obs = {key: read_elem(f["obs"][key]) for key in keys}
    var = read_elem(f["var"])
    element = f[name]
    if isinstance(element, h5py.Dataset):  # dense X
        num_rows = element.shape[0]

        def rows(start: int, stop: int):
            from scipy import sparse

            return sparse.csr_matrix(element[start:stop])
    else:
        matrix = sparse_dataset(element)
        if matrix.format != "csr":
            raise ValueError(f"{where} is stored {matrix.format.upper()}; prepare reads cells as CSR rows")
        num_rows = matrix.shape[0]

        def rows(start: int, stop: int):
            return matrix[start:stop]

    return CountMatrix(where, num_rows, [str(v) for v in var.index], obs, rows)


def read_10x(folder: str, keys: list[str]) -> CountMatrix:
    """Cell Ranger's matrix.mtx.gz (features × barcodes), features.tsv.gz and barcodes.tsv.gz."""
    from scipy import io, sparse

    missing = [n for n in TENX_FILES if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise ValueError(f"{folder}: a 10x folder needs {', '.join(TENX_FILES)}; missing {', '.join(missing)}")
    if keys:
        raise ValueError(f"{folder}: a 10x folder has no cell annotations for --batch-key or --labels-key")
    with gzip.open(os.path.join(folder, "matrix.mtx.gz"), "rb") as f:
        matrix = sparse.csr_matrix(io.mmread(f).T)
    with gzip.open(os.path.join(folder, "features.tsv.gz"), "rt") as f:
        features = [line.rstrip("\n").split("\t")[0] for line in f if line.strip()]
    if len(features) != matrix.shape[1]:
        raise ValueError(f"{folder}: features.tsv.gz names {len(features)} features, the matrix has {matrix.shape[1]}")
    return CountMatrix(f"{folder}/matrix.mtx.gz", matrix.shape[0], features, {}, lambda a, b: matrix[a:b])


def read_npz(path: str, keys: list[str]) -> CountMatrix:
    """A scipy.sparse matrix saved with `scipy.sparse.save_npz`; cell annotations, where asked for, from a CSV
    beside it (PATH without .npz, plus .obs.csv: one row per cell, a header naming the columns)."""
    import pandas as pd
    from scipy import sparse

    try:
        matrix = sparse.load_npz(path).tocsr()
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"{path}: not a scipy.sparse .npz matrix ({err})") from None
    obs = {}
    if keys:
        obs_path = path[: -len(".npz")] + ".obs.csv"
        if not os.path.exists(obs_path):
            raise ValueError(f"{path}: --batch-key/--labels-key need the cells' annotations in {obs_path}")
        table = pd.read_csv(obs_path, dtype=str, keep_default_na=False)
        if len(table) != matrix.shape[0]:
            raise ValueError(f"{obs_path} has {len(table)} rows, the matrix {matrix.shape[0]} cells")
        _check_keys(keys, table.columns, obs_path)
        obs = {k: table[k] for k in keys}
    features = [f"feature_{i}" for i in range(matrix.shape[1])]
    return CountMatrix(path, matrix.shape[0], features, obs, lambda a, b: matrix[a:b])


def _check_keys(keys: list[str], columns, where: str) -> None:
    missing = [k for k in keys if k not in columns]
    if missing:
        held = ", ".join(map(str, columns))
        raise ValueError(f"{where} has no cell annotation {', '.join(map(repr, missing))} (its obs columns: {held})")


def is_sparse_npz(path: str) -> bool:
    """An .npz written by scipy.sparse.save_npz (not an array archive of np.savez)."""
    with np.load(path, allow_pickle=False) as held:
        return {"indptr", "indices", "data", "shape"} <= set(held.files)
