"""The Parquet layout every dataset of ours has: what `prepare` writes and the reader expects.

Each file holds
  pixels  fixed_size_binary[D] (uint8 images) or fixed_size_list<float32>[D]: the example, flattened
          row-major. uint8 images are stored as D bytes because Parquet decodes a binary value ~10×
          faster than a list of D numbers with their repetition levels (benchmarks/reader.py).
  index   int64                                 the example's position in the source split
  label   int64                                 where the source has labels
or, for counts (cells × genes, documents × words: `--format h5ad | 10x | npz`), each row sparse:
  counts_indices  list<int32>    the columns (genes) of the row's non-zero counts, ascending
  counts_values   list<int32>    those counts
  library_size    int64          the row's total count, Σ of its counts
  index, label    as above; label's category names in the metadata (META_LABEL_NAMES)
  <covariate>     int32          per categorical covariate (`batch` for --batch-key, and each of
                                 --categorical-covariate-keys by its own name): codes into the names in
                                 the metadata (META_COVARIATES)
with the number of columns as the shape [D], and the columns' names (gene ids) in the metadata.
A dataset is one split: `prepare` writes OUTPUT_URI/train and OUTPUT_URI/test (names.SPLITS), and the
folder above them is refused as a dataset. In the schema metadata are the image shape and the value range
the reader scales to [0, 1], with a checksum of the two. Parquet's footer has no checksum of its own,
and a flipped byte in the range would silently rescale every pixel; pages carry CRC32 checksums
(`write_page_checksum`) that the reader verifies, so a flipped byte in the data is an error, never a wrong
pixel. Columns are zstd-compressed (prepare.py `PIXEL_ENCODING`; files written elsewhere may use any codec Parquet has).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from aevb_dist import names
from aevb_dist.data.sparse_rows import Rows, concat_rows

PIXELS, INDEX, LABEL = "pixels", "index", "label"
META_SHAPE, META_RANGE, META_SOURCE = b"aevb.shape", b"aevb.value_range", b"aevb.source"
META_CHECKSUM = b"aevb.metadata_sha256"
META_LABEL_NAMES = b"aevb.label_names"  # JSON list: the class of each label value (image folders, cells)
COUNT_INDICES, COUNT_VALUES, LIBRARY_SIZE = "counts_indices", "counts_values", "library_size"
META_FEATURE_NAMES = b"aevb.feature_names"  # JSON list: each column's name (gene ids), for counts
META_COVARIATES = b"aevb.covariates"  # JSON {column: [category names]}: the categorical covariates, for counts


def features_digest(feature_names: bytes) -> str:
    """What identifies a dataset of counts' genes, names and order: the sha256 of their JSON as written. `prepare`
    puts it in the index, the reader computes it from a footer, and a checkpoint records it."""
    return hashlib.sha256(feature_names).hexdigest()


def metadata_checksum(shape: bytes, value_range: bytes, *more: bytes) -> bytes:
    """The checksum stored beside the shape and range (their JSON bytes as written), and for counts the
    feature names and covariates."""
    return hashlib.sha256(b"\0".join((shape, value_range, *more))).hexdigest().encode()


@dataclass
class Batch:
    x: Rows  # [b, D] float32 in [0, 1] (binarized for Bernoulli models), or counts as sparse rows
    index: np.ndarray  # [b] int64
    label: Optional[np.ndarray] = None
    # [b, C] int32: the codes of the covariates a model conditions on (model.covariates), in its order; counts only
    covariates: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def rows(self, start: int, stop: int) -> "Batch":
        return self.taken(slice(start, stop))

    def taken(self, rows) -> "Batch":
        """The rows `rows` (a slice, or an array of positions in its order), every column alike."""
        return Batch(self.x[rows], self.index[rows], *(None if a is None else a[rows] for a in self.per_row()))

    def per_row(self) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """The optional columns beside x and index: label and covariates."""
        return self.label, self.covariates

    def then(self, other: "Batch") -> "Batch":
        return concat([self, other])

    def arrays(self) -> list[np.ndarray]:
        """Every array the rows are held in."""
        x_arrays = [self.x] if isinstance(self.x, np.ndarray) else list(self.x.arrays())
        return [*x_arrays, self.index, *(a for a in self.per_row() if a is not None)]


def concat(batches: list[Batch]) -> Batch:
    if not batches:
        return Batch(np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
    optional = zip(*(b.per_row() for b in batches))
    return Batch(
        concat_rows([b.x for b in batches]),
        np.concatenate([b.index for b in batches]),
        *(None if any(a is None for a in column) else np.concatenate(column) for column in optional),
    )


def pixel_width(pix: pa.DataType, path: str) -> int:
    """D, the pixels per example, from the pixels column's type."""
    if pa.types.is_fixed_size_binary(pix):
        return pix.byte_width  # one uint8 per pixel
    if pa.types.is_fixed_size_list(pix) and (
        pa.types.is_integer(pix.value_type) or pa.types.is_floating(pix.value_type)
    ):
        return pix.list_size
    raise ValueError(
        f"{path}: column '{PIXELS}' must be fixed_size_binary (uint8) or a fixed-size list of numbers, got {pix}"
    )


def refuse_a_root_of_splits(uri: str, relative_paths: list[str]) -> None:
    """A folder holding `aevb-dist prepare`'s split folders is not one split: read as one, it would mix the
    training and test examples into one silently wrong figure (or train on the test set)."""
    splits = sorted(
        {p.split("/", 1)[0] for p in relative_paths if "/" in p} & set(names.SPLITS), key=names.SPLITS.index
    )
    if splits:
        held = " and ".join(f"{s}/" for s in splits)
        choices = " or ".join(f"{uri.rstrip('/')}/{s}" for s in splits)
        raise ValueError(f"{uri} holds the splits {held} of a prepared dataset, not one split: pass {choices}")
