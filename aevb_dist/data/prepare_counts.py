"""`aevb-dist prepare --format h5ad | 10x | npz`: a count matrix (cells × genes) → sparse Parquet shards in the
counts layout of `schema.py`, split into train and test by a seeded random `--test-fraction` of the cells.

The matrix is read a chunk of rows at a time and each split stored in a random order of its cells (`Buckets`):
host memory holds one chunk, then one bucket, whatever the number of cells (a source whose entries do not come
cell by cell is read whole, saying so: count_sources.py); local disk holds the buckets (as
much again as the dataset) while `prepare` runs.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aevb_dist import names, seeds
from aevb_dist.data import count_sources, sources
from aevb_dist.data.count_sources import Categorical, CountMatrix
from aevb_dist.data.index import INDEX_NAME, index_bytes
from aevb_dist.data.schema import (
    COUNT_INDICES,
    COUNT_VALUES,
    INDEX,
    LABEL,
    LIBRARY_SIZE,
    META_CHECKSUM,
    META_COVARIATES,
    META_FEATURE_NAMES,
    META_LABEL_NAMES,
    META_RANGE,
    META_SHAPE,
    META_SOURCE,
    features_digest,
    metadata_checksum,
)
from aevb_dist.run import scratch

COUNT_FORMATS = ("h5ad", "10x", "npz")
BATCH = "batch"  # the column of --batch-key, named as scvi-tools' registry names it
ROWS_PER_CHUNK = 10_000
BUCKET_ROWS = 50_000  # cells per bucket of the storage order's shuffle (Buckets): its host memory
COUNT_ENCODING = dict(compression="zstd", use_dictionary=False, write_statistics=[INDEX])


def open_matrix(source: str, fmt: str, layer: Optional[str], keys: list[str]) -> CountMatrix:
    if layer is not None and fmt != "h5ad":
        raise ValueError(f"--layer names a layer of an .h5ad; --format {fmt} has none")
    if fmt == "h5ad":
        return count_sources.read_h5ad(source, layer, keys)
    if fmt == "10x":
        return count_sources.read_10x(source, keys)
    return count_sources.read_npz(source, keys)


class SplitWriter:
    """One split's shards: rows arrive in chunks, leave in row groups of `rows_per_row_group`, `quota` per file."""

    def __init__(self, fs, folder: str, num_rows: int, num_shards: int, rows_per_row_group: int, schema: pa.Schema):
        self.fs, self.folder, self.rows_per_row_group = fs, folder, rows_per_row_group
        self.num_rows, self.quota = num_rows, -(-num_rows // max(1, min(num_shards, num_rows)))
        self.schema = schema
        self.pending: list[pa.Table] = []
        self.files: list[list] = []  # [name, [rows of each row group]]
        self.writer, self.handle, self.in_file, self.written = None, None, 0, 0
        fs.makedirs(folder, exist_ok=True)

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        while sum(t.num_rows for t in self.pending) >= min(self.rows_per_row_group, self.quota - self.in_file):
            self._write_row_group()

    def _write_row_group(self) -> None:
        held = pa.concat_tables(self.pending)
        size = min(self.rows_per_row_group, self.quota - self.in_file, held.num_rows)
        if self.writer is None:
            name = f"part-{len(self.files):05d}.parquet"
            self.handle = self.fs.open(f"{self.folder}/{name}", "wb")
            self.writer = pq.ParquetWriter(self.handle, self.schema, write_page_checksum=True, **COUNT_ENCODING)
            self.files.append([name, []])
        self.writer.write_table(held.slice(0, size), row_group_size=size)
        self.files[-1][1].append(size)
        self.pending = [held.slice(size)] if size < held.num_rows else []
        self.in_file += size
        self.written += size
        if self.in_file == self.quota:
            self._close_file()

    def close(self) -> list[list]:
        while self.pending and sum(t.num_rows for t in self.pending):
            self._write_row_group()
        self._close_file()
        return self.files

    def _close_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.handle.close()
        self.writer, self.handle, self.in_file = None, None, 0


def _table(chunk, index: np.ndarray, label, covariates: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    indptr = chunk.indptr.astype(np.int32)
    columns = {
        COUNT_INDICES: pa.ListArray.from_arrays(pa.array(indptr), pa.array(chunk.indices.astype(np.int32))),
        COUNT_VALUES: pa.ListArray.from_arrays(pa.array(indptr), pa.array(chunk.data.astype(np.int32))),
        LIBRARY_SIZE: pa.array(np.asarray(chunk.sum(axis=1)).ravel().astype(np.int64)),
        INDEX: pa.array(index),
    }
    if label is not None:
        columns[LABEL] = pa.array(label.astype(np.int64))
    columns.update({name: pa.array(codes) for name, codes in covariates.items()})
    return pa.table(columns, schema=schema)


RESERVED_COLUMNS = (COUNT_INDICES, COUNT_VALUES, LIBRARY_SIZE, INDEX, LABEL)


def covariate_columns(batch_key: Optional[str], covariate_keys: list[str]) -> dict[str, str]:
    """The covariates' columns, each → the obs key it holds: `batch` for --batch-key, and each of
    --categorical-covariate-keys under its own name. A name taken twice, or one of the layout's own, is refused."""
    named = {BATCH: batch_key} if batch_key else {}
    for key in covariate_keys:
        if key in named or key in RESERVED_COLUMNS:
            raise ValueError(
                f"--categorical-covariate-keys {key}: a column named {key!r} is already written "
                f"({'by --batch-key' if key == BATCH else 'by the layout'}); rename the obs column"
            )
        named[key] = key
    return named


def _annotations(matrix: CountMatrix, batch_key, labels_key, covariate_keys) -> tuple[Optional[Categorical], dict]:
    """The label and the covariates' columns (name → Categorical), refusing cells without a value."""
    named = covariate_columns(batch_key, covariate_keys)
    coded = {}
    for column, key in [*named.items(), *([(LABEL, labels_key)] if labels_key else [])]:
        coded[column] = count_sources.categorical(matrix.obs[key], key, matrix.where)
        if (coded[column].codes < 0).any():
            row = int(np.flatnonzero(coded[column].codes < 0)[0])
            raise ValueError(f"{matrix.where}: cell {row} has no value for {key!r}; every cell needs one")
    return coded.pop(LABEL, None), coded


def _counts_schema(matrix: CountMatrix, fmt: str, label: Optional[Categorical], covariates: dict) -> pa.Schema:
    """The files' columns, and their metadata: the features' number and names, categories, and their checksum."""
    features = json.dumps(matrix.feature_names).encode()
    covariate_names = json.dumps({k: c.categories for k, c in covariates.items()}).encode()
    shape, value_range = json.dumps([len(matrix.feature_names)]).encode(), b"counts"
    metadata = {
        META_SHAPE: shape,
        META_RANGE: value_range,
        META_FEATURE_NAMES: features,
        META_COVARIATES: covariate_names,
        META_SOURCE: fmt.encode(),
        META_CHECKSUM: metadata_checksum(shape, value_range, features, covariate_names),
        **({META_LABEL_NAMES: json.dumps(label.categories).encode()} if label else {}),
    }
    fields = [
        pa.field(COUNT_INDICES, pa.list_(pa.int32())),
        pa.field(COUNT_VALUES, pa.list_(pa.int32())),
        pa.field(LIBRARY_SIZE, pa.int64()),
        pa.field(INDEX, pa.int64()),
        *([pa.field(LABEL, pa.int64())] if label else []),
        *[pa.field(name, pa.int32()) for name in covariates],
    ]
    return pa.schema(fields, metadata=metadata)


class Buckets:
    """A split's cells scattered at random into local files of about BUCKET_ROWS cells each (pass 1), then each
    file read back whole and permuted (pass 2): the split stored in a random order of all its cells, with host
    memory bounded by a bucket, whatever the atlas's size and order. Atlases come sorted by donor, dataset or
    cell type; stored in that order, a batch would hold a few neighbouring row groups' cells (the reader's
    shuffle window) and its gradient would swing from one kind of cell to another."""

    def __init__(self, folder: str, num_rows: int, schema: pa.Schema, rng: np.random.Generator):
        self.folder, self.schema, self.rng = folder, schema, rng
        self.num_buckets = max(1, -(-num_rows // BUCKET_ROWS))
        self.bucket_of_row = rng.integers(self.num_buckets, size=num_rows, dtype=np.int32)
        self.writers: dict[int, pq.ParquetWriter] = {}

    def add(self, table: pa.Table, rows: np.ndarray) -> None:
        """`table`'s cells, the split's cells `rows` (positions within the split), each into its bucket."""
        buckets = self.bucket_of_row[rows]
        for bucket in np.unique(buckets):
            if bucket not in self.writers:
                self.writers[bucket] = pq.ParquetWriter(f"{self.folder}/{bucket}.parquet", self.schema)
            self.writers[bucket].write_table(table.take(np.flatnonzero(buckets == bucket)))

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def shuffled(self):
        """Each bucket's cells in a random order, bucket after bucket (once `close`d)."""
        for bucket in sorted(self.writers):
            table = pq.read_table(f"{self.folder}/{bucket}.parquet", schema=self.schema)
            yield table.take(self.rng.permutation(table.num_rows))


def write_counts(
    fs,
    staging: str,
    matrix: CountMatrix,
    fmt: str,
    *,
    wanted: list[str],
    test_fraction: float,
    seed: int,
    num_shards: int,
    rows_per_row_group: int,
    batch_key: Optional[str],
    labels_key: Optional[str],
    covariate_keys: list[str],
    report: Callable[[str], None],
) -> dict[str, int]:
    """Writes each wanted split's shards and index under `staging`, its cells in a seeded random order (each
    cell's `index` is its row in the source); rows written per split."""
    label, covariates = _annotations(matrix, batch_key, labels_key, covariate_keys)
    schema = _counts_schema(matrix, fmt, label, covariates)
    rows = sources.split_rows(matrix.num_rows, test_fraction, seed)
    position = np.zeros(matrix.num_rows, np.int64)  # each cell's position within its split
    for name in names.SPLITS:
        position[rows[name]] = np.arange(len(rows[name]))
    with scratch.folder("prepare") as local:

        def scatter(matrix: CountMatrix) -> dict:
            buckets = {}
            for name in wanted:
                shutil.rmtree(f"{local}/{name}", ignore_errors=True)
                os.makedirs(f"{local}/{name}")
                order = np.random.default_rng(seeds.storage_order_seed(seed, names.SPLITS.index(name)))
                buckets[name] = Buckets(f"{local}/{name}", len(rows[name]), schema, order)
            try:
                _scatter(matrix, rows, position, label, covariates, schema, buckets, report)
            finally:
                for split_buckets in buckets.values():
                    split_buckets.close()
            return buckets

        try:
            buckets = scatter(matrix)
        except count_sources.NotInCellOrder as err:  # the same cells and order, from the matrix held whole
            report(f"prepare: {err}; it is read whole instead (host memory for the whole matrix)")
            buckets = scatter(matrix.whole())
        counts = {}
        for name, split_buckets in buckets.items():
            writer = SplitWriter(fs, f"{staging}/{name}", len(rows[name]), num_shards, rows_per_row_group, schema)
            for table in split_buckets.shuffled():
                writer.add(table)
            _write_index(fs, f"{staging}/{name}", writer.close(), schema, label, covariates)
            counts[name] = writer.written
            report(f"prepare: {name} written ({writer.written:,} cells in {len(writer.files)} files)")
    return counts


def _scatter(matrix, rows, position, label, covariates, schema, buckets: dict, report) -> None:
    """Pass 1: the source read in chunks of rows, each cell into a bucket of its split."""
    test = np.zeros(matrix.num_rows, bool)
    test[rows["test"]] = True
    empty_cells = 0
    for start, chunk in matrix.chunks(ROWS_PER_CHUNK):
        stop = start + chunk.shape[0]
        empty_cells += int((np.diff(chunk.indptr) == 0).sum())
        for name, split_buckets in buckets.items():
            keep = np.flatnonzero(test[start:stop] == (name == "test"))
            index = start + keep
            part_label = None if label is None else label.codes[index]
            part_covariates = {k: c.codes[index] for k, c in covariates.items()}
            table = _table(chunk[keep], index.astype(np.int64), part_label, part_covariates, schema)
            split_buckets.add(table, position[index])
        report(f"prepare: {stop:,}/{matrix.num_rows:,} cells read")
    if empty_cells:
        report(f"prepare: warning: {empty_cells:,} cells have no counts at all (kept; consider filtering them)")


def _write_index(fs, folder: str, files: list, schema: pa.Schema, label, covariates: dict) -> None:
    dim = len(json.loads(schema.metadata[META_FEATURE_NAMES]))
    description = {
        "dim": dim,
        "shape": [dim],
        "value_range": None,
        "has_label": label is not None,
        "files": files,
        "counts": True,
        "features_sha256": features_digest(schema.metadata[META_FEATURE_NAMES]),
        "covariates": {k: c.categories for k, c in covariates.items()},
    }
    fs.pipe_file(f"{folder}/{INDEX_NAME}", index_bytes(description))
