"""Encoded images from elsewhere, for `aevb-dist prepare`: a folder of PNG/JPEG files (one subfolder per
class, or flat) and a Parquet dataset whose image column holds encoded bytes (the layout the Hugging Face
`datasets` library writes: a struct {bytes, path} per image, or a plain binary column). Decoded once, here,
in parallel across the machine's cores, with progress; every image ends as uint8 [H, W] (gray) or
[3, H, W] (color, channels first, as model.architecture=conv reads it).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
Source = Union[str, bytes]  # a file's path, or an image's encoded bytes


@dataclass(frozen=True)
class ImageOptions:
    size: Optional[tuple[int, int]] = None  # (H, W): center-crop to the aspect ratio, then resize
    grayscale: bool = False
    skip_bad: bool = False  # leave unreadable images out (counted) instead of stopping
    image_column: Optional[str] = None  # Parquet: default "image", "img" or "pixels"
    label_column: Optional[str] = None  # Parquet: default "label" where there is one


def _decode(source: Source, size: Optional[tuple[int, int]], grayscale: bool) -> np.ndarray:
    """One image → uint8 [H, W, 3] (or [H, W] with `grayscale`); `size` (H, W): center-crop to its aspect
    ratio, then resize. Raises on anything that is not a complete image."""
    from PIL import Image

    with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as img:
        img.load()  # a truncated file fails here, not later
        img = img.convert("L" if grayscale else "RGB")
        if size is not None:
            img = _crop_to_aspect(img, size).resize((size[1], size[0]), Image.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def _crop_to_aspect(img, size: tuple[int, int]):
    width, height = img.size
    want = size[1] / size[0]  # width / height
    if width / height > want:  # too wide
        keep = round(height * want)
        left = (width - keep) // 2
        return img.crop((left, 0, left + keep, height))
    keep = round(width / want)
    top = (height - keep) // 2
    return img.crop((0, top, width, top + keep))


def _decode_chunk(sources: list[Source], size, grayscale) -> list[tuple[Optional[np.ndarray], Optional[str]]]:
    out = []
    for source in sources:
        try:
            out.append((_decode(source, size, grayscale), None))
        except Exception as err:  # PIL raises several types for bad input
            out.append((None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
    return out


def decode_images(
    sources: list[Source],
    names: list[str],
    *,
    size: Optional[tuple[int, int]],
    grayscale: bool,
    skip_bad: bool,
    report: Callable[[str], None],
    workers: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W] or [N, 3, H, W] uint8, positions of the sources kept). A source that does not decode
    stops the conversion naming it, or with `skip_bad` is left out and counted."""
    if not sources:
        raise ValueError("no images found")
    chunk = max(1, min(256, len(sources) // (4 * (os.cpu_count() or 1)) or 1))
    starts = list(range(0, len(sources), chunk))
    decoded: list[Optional[np.ndarray]] = []
    bad: list[str] = []
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(_decode_chunk, sources[s : s + chunk], size, grayscale) for s in starts]
        step = max(1, len(futures) // 10)
        for i, (start, future) in enumerate(zip(starts, futures)):
            for j, (image, error) in enumerate(future.result()):
                if error is not None:
                    if not skip_bad:
                        raise ValueError(
                            f"{names[start + j]}: not a readable image ({error}); "
                            "pass --skip-bad to leave such images out"
                        )
                    bad.append(names[start + j])
                decoded.append(image)
            if (i + 1) % step == 0 or i + 1 == len(futures):
                report(f"prepare: decoded {min(start + chunk, len(sources)):,}/{len(sources):,} images")
    if bad:
        report(f"prepare: skipped {len(bad):,} unreadable image(s), e.g. {bad[0]}")
    kept = np.asarray([i for i, image in enumerate(decoded) if image is not None], dtype=np.int64)
    if not len(kept):
        raise ValueError("no readable images")
    return _stack([decoded[i] for i in kept], [names[i] for i in kept]), kept


def _stack(images: list[np.ndarray], names: list[str]) -> np.ndarray:
    shapes = {}
    for image, name in zip(images, names):
        shapes.setdefault(image.shape[:2], name)
        if len(shapes) > 1:
            (a, first), (b, second) = list(shapes.items())[:2]
            raise ValueError(
                f"images of different sizes: {first} is {a[0]}×{a[1]}, {second} is {b[0]}×{b[1]}; "
                "pass --size H W to crop and resize them all"
            )
    stacked = np.stack(images)
    if stacked.ndim == 4:
        if (stacked[..., 0] == stacked[..., 1]).all() and (stacked[..., 0] == stacked[..., 2]).all():
            return np.ascontiguousarray(stacked[..., 0])  # every image gray: one channel
        return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))  # [N, 3, H, W]
    return stacked


def list_image_folder(folder: str) -> tuple[list[str], Optional[np.ndarray], Optional[list[str]]]:
    """(image paths in sorted order, labels or None, class names or None). One subfolder per class (labels
    by the sorted folder names), or the images in the folder itself (no labels)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder (--format imagefolder reads a folder of PNG/JPEG files)")
    entries = sorted(os.listdir(folder))
    classes = [e for e in entries if os.path.isdir(os.path.join(folder, e)) and not e.startswith(".")]
    if classes:
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = _images_in(os.path.join(folder, name))
            paths += found
            labels += [label] * len(found)
        if not paths:
            raise ValueError(f"{folder}: no PNG or JPEG files in its {len(classes)} subfolder(s)")
        return paths, np.asarray(labels, dtype=np.int64), classes
    paths = _images_in(folder)
    if not paths:
        raise ValueError(f"{folder}: no PNG or JPEG files (*.png, *.jpg, *.jpeg)")
    return paths, None, None


def _images_in(folder: str) -> list[str]:
    return [
        os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
    ]


def read_parquet_images(
    path: str, image_column: Optional[str], label_column: Optional[str]
) -> tuple[list[bytes], list[str], Optional[np.ndarray]]:
    """(encoded images, a name for each — its `path` field or the row — and labels or None) of a Parquet
    file or folder of files whose image column is a struct {bytes, path} or binary."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        table = ds.dataset(path, format="parquet").to_table()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet dataset ({str(err).splitlines()[0]})") from None
    columns = table.column_names
    image_column = image_column or next((c for c in ("image", "img", "pixels") if c in columns), None)
    if image_column not in columns:
        raise ValueError(
            f"{path}: no image column {image_column!r}; pass --image-column (columns: {', '.join(columns)})"
        )
    column = table.column(image_column).combine_chunks()
    images = _encoded_values(column, path, image_column)
    paths = (
        column.field("path").to_pylist()
        if pa.types.is_struct(column.type) and column.type.get_field_index("path") >= 0
        else None
    )
    names = [f"{path} row {i}" + (f" ({paths[i]})" if paths and paths[i] else "") for i in range(len(images))]
    labels = None
    label_column = label_column or ("label" if "label" in columns else None)
    if label_column is not None:
        if label_column not in columns:
            raise ValueError(f"{path}: no label column {label_column!r} (columns: {', '.join(columns)})")
        labels = np.asarray(table.column(label_column).to_numpy(zero_copy_only=False), dtype=np.int64)
    if any(image is None for image in images):
        raise ValueError(f"{path}: column {image_column!r} has empty (null) images")
    return images, names, labels


# -- streaming a Parquet dataset of encoded images in training (ParquetDataset with an image column) ------
def describe_encoded_file(parquet_file, path: str, column: str) -> list[int]:
    """The example shape of a Parquet file of encoded images, from its first image: [H, W] for a gray one,
    [3, H, W] otherwise (every later image must match it)."""
    from PIL import Image

    table = parquet_file.read_row_group(0, columns=[column])
    first = _encoded_values(table.column(column).combine_chunks(), path, column)[0]
    with Image.open(io.BytesIO(first)) as img:
        width, height = img.size
        return [height, width] if img.mode in ("1", "L", "LA", "I", "I;16", "F") else [3, height, width]


def _encoded_values(column, path: str, name: str) -> list:
    """The encoded images of a column: a struct {bytes, path, ...}'s bytes, or a binary column's values."""
    import pyarrow as pa

    if pa.types.is_struct(column.type):
        fields = [column.type.field(i).name for i in range(column.type.num_fields)]
        if "bytes" not in fields:
            raise ValueError(f"{path}: column {name!r} is a struct without a 'bytes' field ({', '.join(fields)})")
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ValueError(f"{path}: column {name!r} holds {column.type}, not encoded image bytes")
    return column.to_pylist()


def decode_rows(column, name: str, shape: list[int], where: str) -> np.ndarray:
    """A row group's encoded images → uint8 [n, prod(shape)], channels first; one line for an image that
    does not decode or does not have the dataset's shape."""
    values = _encoded_values(column, where, name)
    rows = np.empty((len(values), int(np.prod(shape))), dtype=np.uint8)
    for i, value in enumerate(values):
        try:
            image = _decode(value, None, grayscale=len(shape) == 2)
        except Exception as err:
            raise ValueError(f"{where} row {i}: not a readable image ({type(err).__name__})") from None
        if image.ndim == 3:
            image = image.transpose(2, 0, 1)
        if list(image.shape) != list(shape):
            raise ValueError(
                f"{where} row {i}: an image of shape {list(image.shape)}, the dataset's is {list(shape)} "
                "(prepare it with --size to resize)"
            )
        rows[i] = image.reshape(-1)
    return rows
