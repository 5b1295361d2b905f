"""Readers of count matrices for `aevb-dist prepare`: AnnData (.h5ad), a Cell Ranger output folder (10x) and
a scipy.sparse matrix (.npz). Each gives its cells (rows) in chunks as CSR, with the genes' names and the
cells' annotations (obs) that `prepare` is asked to keep.

Each is streamed, a chunk of cells at a time, so a file larger than memory converts: an .h5ad read backed from X or
any layer (dense or CSR); a 10x matrix.mtx.gz parsed as it decompresses, cut at barcode boundaries (Cell Ranger
writes its entries barcode by barcode); an .npz holding CSR read member by member as it decompresses. A 10x matrix
in another entry order, an .npz holding another format, or an .h5ad stored CSC cannot be cut into cells that way: it
is read whole.
`anndata` and `h5py` come with `pip install "aevb-dist[singlecell]"`.
"""

from __future__ import annotations

import gzip
import os
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

TENX_FILES = ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz")
MTX_BLOCK_BYTES = 1 << 20  # text of a matrix.mtx.gz parsed at a time (~80,000 entries; as fast as larger blocks)


class NotInCellOrder(ValueError):
    """A source whose entries do not come cell by cell: it cannot be streamed in chunks of cells (`CountMatrix.whole`
    reads it whole instead)."""


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
    _chunks: Callable[[int], Iterator[tuple[int, object]]] = None  # rows per chunk → (first row, CSR) chunks
    _whole: Optional[Callable[[], "CountMatrix"]] = None  # the same matrix read whole, for NotInCellOrder

    def chunks(self, rows_per_chunk: int) -> Iterator[tuple[int, "object"]]:
        """(first row, CSR of the next rows) over the whole matrix, each checked to hold counts; raises
        NotInCellOrder, before the chunk it would cut wrong, where the source's entries are not cell by cell."""
        for start, chunk in self._chunks(rows_per_chunk):
            check_counts(chunk, self.where, start)
            yield start, chunk

    def whole(self) -> "CountMatrix":
        """The matrix read into memory whole: for a source whose entries are not cell by cell."""
        return self._whole()


def _sliced(rows: Callable[[int, int], object], num_rows: int) -> Callable[[int], Iterator[tuple[int, object]]]:
    """Chunks from a reader of any row range."""
    return lambda size: ((start, rows(start, min(start + size, num_rows))) for start in range(0, num_rows, size))


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
    features = [str(v) for v in read_elem(f["var"]).index]
    element = f[name]
    if isinstance(element, h5py.Dataset):  # dense X
        num_rows = element.shape[0]

        def rows(start: int, stop: int):
            from scipy import sparse

            return sparse.csr_matrix(element[start:stop])
    else:
        matrix = sparse_dataset(element)
        num_rows = matrix.shape[0]
        if matrix.format != "csr":  # CSC: a gene's counts lie together, a cell's are spread over the whole file

            def not_in_cell_order(size: int) -> Iterator[tuple[int, object]]:
                raise NotInCellOrder(f"{where} is stored {matrix.format.upper()}, gene by gene, not cell by cell")

            def whole() -> CountMatrix:
                held = matrix.to_memory().tocsr()
                return CountMatrix(where, num_rows, features, obs, _sliced(lambda a, b: held[a:b], num_rows))

            return CountMatrix(where, num_rows, features, obs, not_in_cell_order, whole)

        def rows(start: int, stop: int):
            return matrix[start:stop]

    return CountMatrix(where, num_rows, features, obs, _sliced(rows, num_rows))


def read_10x(folder: str, keys: list[str]) -> CountMatrix:
    """Cell Ranger's matrix.mtx.gz (features × barcodes, MatrixMarket coordinates), features.tsv.gz and
    barcodes.tsv.gz."""
    missing = [n for n in TENX_FILES if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise ValueError(f"{folder}: a 10x folder needs {', '.join(TENX_FILES)}; missing {', '.join(missing)}")
    if keys:
        raise ValueError(f"{folder}: a 10x folder has no cell annotations for --batch-key or --labels-key")
    path = os.path.join(folder, "matrix.mtx.gz")
    header = _mtx_header(path)
    with gzip.open(os.path.join(folder, "features.tsv.gz"), "rt") as f:
        features = [line.rstrip("\n").split("\t")[0] for line in f if line.strip()]
    if len(features) != header.num_features:
        raise ValueError(
            f"{folder}: features.tsv.gz names {len(features)} features, the matrix has {header.num_features}"
        )
    with gzip.open(os.path.join(folder, "barcodes.tsv.gz"), "rt") as f:
        num_barcodes = sum(1 for line in f if line.strip())
    if num_barcodes != header.num_cells:
        raise ValueError(f"{folder}: barcodes.tsv.gz names {num_barcodes} cells, the matrix has {header.num_cells}")

    def whole() -> CountMatrix:
        from scipy import io, sparse

        with gzip.open(path, "rb") as f:
            matrix = sparse.csr_matrix(io.mmread(f).T)
        return CountMatrix(path, matrix.shape[0], features, {}, _sliced(lambda a, b: matrix[a:b], matrix.shape[0]))

    return CountMatrix(path, header.num_cells, features, {}, lambda size: _mtx_cells(path, header, size), whole)


@dataclass(frozen=True)
class _MtxHeader:
    num_features: int
    num_cells: int
    num_entries: int
    pattern: bool  # entries without values: each is a 1
    nbytes: int  # the banner, comments and the size line


def _mtx_header(path: str) -> _MtxHeader:
    with gzip.open(path, "rb") as f:
        first = f.readline()
        banner, nbytes = first.decode(errors="replace").split(), len(first)
        line = f.readline()
        while line.startswith(b"%"):
            nbytes += len(line)
            line = f.readline()
        nbytes += len(line)
    if len(banner) != 5 or banner[0] != "%%MatrixMarket" or banner[2] != "coordinate":
        raise ValueError(f"{path} is not a MatrixMarket coordinate matrix (its first line: {' '.join(banner)})")
    if banner[4] != "general" or banner[3] not in ("integer", "real", "pattern"):
        raise ValueError(f"{path}: a {banner[3]} {banner[4]} matrix holds no counts (integer, general expected)")
    num_features, num_cells, num_entries = (int(v) for v in line.split())
    return _MtxHeader(num_features, num_cells, num_entries, banner[3] == "pattern", nbytes)


def _mtx_cells(path: str, header: _MtxHeader, cells_per_chunk: int) -> Iterator[tuple[int, object]]:
    """Chunks of whole cells, cut as the file decompresses: entries must come barcode by barcode (Cell Ranger's
    order); NotInCellOrder at the first entry that does not."""
    pending: list[tuple[np.ndarray, ...]] = []  # (0-based feature, cell, value) parts not yet in a chunk
    start = 0
    stop = min(cells_per_chunk, header.num_cells)  # the end of the next chunk
    for part, complete_below in _mtx_parts(path, header):
        pending.append(part)
        if start == header.num_cells or stop > complete_below:
            continue  # not a whole chunk yet: the parts are joined once, when one is
        feature, cell, value = (np.concatenate(column) for column in zip(*pending))
        while start < header.num_cells and stop <= complete_below:
            # the entries come cell by cell: each cell's run of them is a CSR row, found by binary search
            indptr = np.searchsorted(cell, np.arange(start, stop + 1))
            cut = int(indptr[-1])
            yield start, _csr(value[:cut], feature[:cut], indptr, (stop - start, header.num_features))
            feature, cell, value = feature[cut:], cell[cut:], value[cut:]
            start, stop = stop, min(stop + cells_per_chunk, header.num_cells)
        pending = [(feature, cell, value)]


def _mtx_parts(path: str, header: _MtxHeader) -> Iterator[tuple[tuple[np.ndarray, ...], int]]:
    """The file's entries a block at a time, as ((feature, cell, value), every cell below this one is complete);
    last, no entries and the number of cells."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    stream = pa.input_stream(path, compression="gzip")
    stream.read(header.nbytes)  # the banner, comments and sizes: the entries follow
    columns = ["feature", "cell"] if header.pattern else ["feature", "cell", "value"]
    reader = pacsv.open_csv(
        stream,
        read_options=pacsv.ReadOptions(column_names=columns, block_size=MTX_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(delimiter=" ", quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={"feature": pa.int64(), "cell": pa.int64(), "value": pa.float64()}
        ),
    )
    read, last_cell = 0, 0
    for part in reader:
        if part.num_rows == 0:
            continue
        cell, feature = part.column("cell").to_numpy() - 1, part.column("feature").to_numpy() - 1
        _check_entries(path, read, feature, cell, header)
        if (np.diff(cell) < 0).any() or cell[0] < last_cell:
            raise NotInCellOrder(f"{path}: its entries are not sorted by barcode (after entry {read:,})")
        value = np.ones(len(cell)) if header.pattern else part.column("value").to_numpy()
        read, last_cell = read + len(cell), int(cell[-1])
        yield (feature, cell, value), last_cell
    if read != header.num_entries:
        raise ValueError(f"{path} holds {read:,} entries; its header says {header.num_entries:,}")
    empty = np.empty(0, np.int64)
    yield (empty, empty, np.empty(0, np.float64)), header.num_cells


def _check_entries(path: str, read: int, feature: np.ndarray, cell: np.ndarray, header: _MtxHeader) -> None:
    bad = (feature < 0) | (feature >= header.num_features) | (cell < 0) | (cell >= header.num_cells)
    if bad.any():
        entry = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path}: entry {read + entry + 1:,} names feature {feature[entry] + 1}, cell {cell[entry] + 1} of a "
            f"{header.num_features} × {header.num_cells} matrix"
        )


def _csr(value: np.ndarray, feature: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]):
    from scipy import sparse

    return sparse.csr_matrix((value, feature, indptr), shape=shape)


def read_npz(path: str, keys: list[str]) -> CountMatrix:
    """A scipy.sparse matrix saved with `scipy.sparse.save_npz`; cell annotations, where asked for, from a CSV
    beside it (PATH without .npz, plus .obs.csv: one row per cell, a header naming the columns)."""
    import pandas as pd

    try:
        with zipfile.ZipFile(path) as archive:
            fmt = _npy_member(archive, "format").item()
            fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
            num_rows, num_features = (int(v) for v in _npy_member(archive, "shape"))
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a scipy.sparse .npz matrix ({err})") from None
    obs = {}
    if keys:
        obs_path = path[: -len(".npz")] + ".obs.csv"
        if not os.path.exists(obs_path):
            raise ValueError(f"{path}: --batch-key/--labels-key need the cells' annotations in {obs_path}")
        table = pd.read_csv(obs_path, dtype=str, keep_default_na=False)
        if len(table) != num_rows:
            raise ValueError(f"{obs_path} has {len(table)} rows, the matrix {num_rows} cells")
        _check_keys(keys, table.columns, obs_path)
        obs = {k: table[k] for k in keys}
    features = [f"feature_{i}" for i in range(num_features)]

    def whole() -> CountMatrix:
        from scipy import sparse

        matrix = sparse.load_npz(path).tocsr()
        return CountMatrix(path, num_rows, features, obs, _sliced(lambda a, b: matrix[a:b], num_rows))

    def chunks(size: int) -> Iterator[tuple[int, object]]:
        if fmt != "csr":
            raise NotInCellOrder(f"{path} holds a {fmt.upper()} matrix, not CSR rows of cells")
        yield from _npz_csr_cells(path, num_rows, num_features, size)

    return CountMatrix(path, num_rows, features, obs, chunks, whole)


def _npz_csr_cells(path: str, num_rows: int, num_features: int, size: int) -> Iterator[tuple[int, object]]:
    """A CSR .npz's rows in chunks, its `indices` and `data` members decompressed as they are read."""
    with zipfile.ZipFile(path) as archive:
        indptr = _npy_member(archive, "indptr").astype(np.int64)
        with _NpyStream(archive, "indices") as indices, _NpyStream(archive, "data") as data:
            for start in range(0, num_rows, size):
                stop = min(start + size, num_rows)
                count = int(indptr[stop] - indptr[start])
                row_starts = indptr[start : stop + 1] - indptr[start]
                yield start, _csr(data.read(count), indices.read(count), row_starts, (stop - start, num_features))


def _npy_member(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with _NpyStream(archive, name) as stream:
        return stream.read(stream.size).reshape(stream.shape)


class _NpyStream:
    """One .npy member of an .npz, read front to back as it decompresses: `read(n)` gives its next n values."""

    def __init__(self, archive: zipfile.ZipFile, name: str):
        self.file = archive.open(f"{name}.npy")
        version = np.lib.format.read_magic(self.file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, _, self.dtype = read_header(self.file)
        if self.dtype.hasobject:
            raise ValueError(f"member {name} holds Python objects")
        self.size = int(np.prod(self.shape))

    def read(self, count: int) -> np.ndarray:
        nbytes = count * self.dtype.itemsize
        buffer = self.file.read(nbytes)
        if len(buffer) != nbytes:
            raise ValueError("the archive ends early")
        return np.frombuffer(buffer, dtype=self.dtype)

    def __enter__(self) -> "_NpyStream":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def _check_keys(keys: list[str], columns, where: str) -> None:
    missing = [k for k in keys if k not in columns]
    if missing:
        held = ", ".join(map(str, columns))
        raise ValueError(f"{where} has no cell annotation {', '.join(map(repr, missing))} (its obs columns: {held})")


def is_sparse_npz(path: str) -> bool:
    """An .npz written by scipy.sparse.save_npz (not an array archive of np.savez)."""
    with np.load(path, allow_pickle=False) as held:
        return {"indptr", "indices", "data", "shape"} <= set(held.files)
