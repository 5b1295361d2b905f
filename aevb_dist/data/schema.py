"""The Parquet layout every dataset of ours has: what `prepare` writes and the reader expects.

Each file holds
  pixels  fixed_size_binary[D] (uint8 images) or fixed_size_list<float32>[D]: the example, flattened
          row-major. uint8 images are stored as D bytes because Parquet decodes a binary value ~10×
          faster than a list of D numbers with their repetition levels (benchmarks/reader.py).
  index   int64                                 the example's position in the source split
  label   int64                                 where the source has labels
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

PIXELS, INDEX, LABEL = "pixels", "index", "label"
META_SHAPE, META_RANGE, META_SOURCE = b"aevb.shape", b"aevb.value_range", b"aevb.source"
META_CHECKSUM = b"aevb.metadata_sha256"
META_LABEL_NAMES = b"aevb.label_names"  # JSON list: the class of each label value (image folders)


def metadata_checksum(shape: bytes, value_range: bytes) -> bytes:
    """The checksum stored beside the shape and range (their JSON bytes as written)."""
    return hashlib.sha256(shape + b"\0" + value_range).hexdigest().encode()


@dataclass
class Batch:
    x: np.ndarray  # [b, D] float32 in [0, 1] (binarized for Bernoulli models)
    index: np.ndarray  # [b] int64
    label: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def rows(self, start: int, stop: int) -> "Batch":
        label = None if self.label is None else self.label[start:stop]
        return Batch(self.x[start:stop], self.index[start:stop], label)

    def then(self, other: "Batch") -> "Batch":
        return concat([self, other])


def concat(batches: list[Batch]) -> Batch:
    if not batches:
        return Batch(np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
    labels = [b.label for b in batches]
    return Batch(
        np.concatenate([b.x for b in batches]),
        np.concatenate([b.index for b in batches]),
        None if any(lab is None for lab in labels) else np.concatenate(labels),
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
