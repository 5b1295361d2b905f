"""Rows of counts held sparse on the host (compressed sparse rows): a row group of an atlas (thousands of
cells × tens of thousands of genes, ~95% zeros) is never a dense array in host memory; only one batch at a
time is, on the device that trains on it (eval/model_input.py). NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np


@dataclass(frozen=True)
class CsrRows:
    """Rows of a [len, num_features] matrix: row r's non-zero entries are values[indptr[r]:indptr[r+1]] at
    columns indices[indptr[r]:indptr[r+1]]. What a `schema.Batch` holds as `x` for a dataset of counts."""

    indptr: np.ndarray  # [rows + 1] int64, starting at 0
    indices: np.ndarray  # [nnz] int32
    values: np.ndarray  # [nnz] float32: counts, integers
    num_features: int

    @staticmethod
    def empty(num_features: int) -> "CsrRows":
        return CsrRows(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), num_features)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.num_features

    @property
    def nbytes(self) -> int:
        return self.indptr.nbytes + self.indices.nbytes + self.values.nbytes

    def __len__(self) -> int:
        return int(self.indptr.shape[0]) - 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.indptr, self.indices, self.values

    def __getitem__(self, rows: Union[slice, np.ndarray]) -> "CsrRows":
        """Rows `start:stop` (a slice, step 1), or the rows at an array of positions, in its order."""
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            assert step == 1, "CsrRows takes contiguous slices"
            stop = max(start, stop)
            lo, hi = self.indptr[start], self.indptr[stop]
            return CsrRows(
                self.indptr[start : stop + 1] - lo, self.indices[lo:hi], self.values[lo:hi], self.num_features
            )
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        indptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # Each kept entry's position in the source: its row's start there, plus its place among the kept entries
        # less its row's start among them (one repeat and one in-place add over the entries).
        taken = np.repeat(starts - indptr[:-1], lengths)
        taken += np.arange(indptr[-1], dtype=np.int64)
        return CsrRows(indptr, self.indices[taken], self.values[taken], self.num_features)

    @staticmethod
    def concat(parts: list["CsrRows"]) -> "CsrRows":
        ends = np.cumsum([0] + [int(p.indptr[-1]) for p in parts])
        indptr = np.concatenate([[0]] + [p.indptr[1:] + end for p, end in zip(parts, ends)]).astype(np.int64)
        return CsrRows(
            indptr,
            np.concatenate([p.indices for p in parts]),
            np.concatenate([p.values for p in parts]),
            parts[0].num_features,
        )


Rows = Union[np.ndarray, CsrRows]


def concat_rows(parts: list[Rows]) -> Rows:
    """Row blocks one after another, dense or sparse as they are held."""
    return CsrRows.concat(parts) if isinstance(parts[0], CsrRows) else np.concatenate(parts)
