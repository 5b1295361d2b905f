"""Readers for the raw datasets `aevb-dist prepare` converts: IDX .gz, Frey Face .mat, .npy/.npz.

Each returns `Split`s of images [N, H, W] (or [N, D]) with optional labels.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from aevb_dist import seeds

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass
class Split:
    images: np.ndarray  # [N, ...]
    labels: Optional[np.ndarray]  # [N] int64, or None
    index: np.ndarray  # [N] int64: the example's position in the source
    label_names: Optional[list[str]] = None  # the class of each label value, where the source names them


def read_idx(path: str) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ValueError(f"{path}: not a readable IDX file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: IDX header says {dims} but the file holds {len(raw) - offset} bytes of data")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def read_idx_folder(folder: str, split: str) -> Split:
    image_name, label_name = IDX_FILES[split]
    image_path, label_path = os.path.join(folder, image_name), os.path.join(folder, label_name)
    if not os.path.exists(image_path):
        raise FileNotFoundError(f"{folder}: no {image_name} (expected MNIST/Fashion-MNIST IDX files)")
    images = read_idx(image_path)
    labels = read_idx(label_path).astype(np.int64) if os.path.exists(label_path) else None
    if images.ndim != 3:
        raise ValueError(f"{image_path}: expected images [N, H, W], got shape {images.shape}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"{label_path}: {labels.shape[0]} labels for {images.shape[0]} images")
    return Split(images, labels, np.arange(images.shape[0], dtype=np.int64))


def read_frey_face(path: str) -> np.ndarray:
    """Sam Roweis's frey_rawface.mat: variable `ff`, 560×1965 uint8 → images [1965, 28, 20]."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises several types for non-MAT input
        raise ValueError(f"{path}: not a readable MATLAB .mat file ({str(err).splitlines()[0]})") from None
    if "ff" not in mat:
        raise ValueError(f"{path}: no variable 'ff' (found: {', '.join(k for k in mat if not k.startswith('__'))})")
    ff = mat["ff"]
    if ff.ndim != 2 or ff.shape[0] != 28 * 20:
        raise ValueError(f"{path}: variable 'ff' should be 560×N, got {ff.shape}")
    return np.ascontiguousarray(ff.T.reshape(-1, 28, 20))


def read_array(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """A .npy array [N, ...], or a .npz with `x` (or `images`/`data`/the only array) and optional `y`/`labels`."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{path}: not a readable .npy/.npz file ({str(err).splitlines()[0]})") from None
    if isinstance(loaded, np.ndarray):
        return loaded, None
    with loaded:
        names = list(loaded.files)
        image_key = next((k for k in ("x", "images", "data") if k in names), names[0] if len(names) == 1 else None)
        if image_key is None:
            raise ValueError(f"{path}: cannot tell which array holds the data; name it 'x' (found: {', '.join(names)})")
        label_key = next((k for k in ("y", "labels") if k in names), None)
        return loaded[image_key], (loaded[label_key] if label_key else None)


def split_rows(n: int, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A deterministic train/test split of row positions, each sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction={test_fraction} must lie strictly between 0 and 1")
    perm = np.random.default_rng(seeds.split_seed(seed)).permutation(n)
    num_test = max(1, int(round(n * test_fraction)))
    if num_test >= n:
        raise ValueError(f"a source of {n} examples is too small to split into train and test")
    return {"test": np.sort(perm[:num_test]), "train": np.sort(perm[num_test:])}
