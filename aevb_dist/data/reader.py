"""Streaming reader of sharded Parquet datasets for data-parallel workers.

The unit of work is a Parquet row group. Every epoch, every rank computes the same
assignment of row groups to ranks from the footers alone (seed, epoch, world size), so:
- every example is read exactly once per epoch across all ranks (no rows dropped, unlike
  Ray Data's `streaming_split(equal=True)`);
- every rank knows how many steps the epoch has (the longest rank's), so all ranks take
  the same number of steps and DDP-style collectives never hang; a rank that runs out
  early contributes empty batches, which is exact because gradients are reduced as sums;
- the position in an epoch is one integer (batches consumed), and resuming skips whole
  row groups by their row counts without reading them.
Shuffling: a seeded permutation of row groups per epoch, then rows shuffled within a
window of consecutive row groups, loaded one window ahead in a thread from remote storage (prefetch.py).
Row groups read are kept decoded in memory up to a budget, for the next epochs (decoded_cache.py).
The epoch's order and a rank's batches: epoch_stream.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aevb_dist import names
from aevb_dist.console import first_line, say
from aevb_dist.data import images
from aevb_dist.data.counts_layout import CountsFooter, read_counts_footer, sparse_rows_of
from aevb_dist.data.decoded_cache import DecodedRowGroups
from aevb_dist.data.index import INDEX_NAME, read_index
from aevb_dist.data.schema import (
    COUNT_INDICES,
    COUNT_VALUES,
    INDEX,
    LABEL,
    META_CHECKSUM,
    META_LABEL_NAMES,
    META_RANGE,
    META_SHAPE,
    PIXELS,
    Batch,
    metadata_checksum,
    pixel_width,
    refuse_a_root_of_splits,
)
from aevb_dist.data.sparse_rows import CsrRows
from aevb_dist.data.value_range import check_range_fits
from aevb_dist.run import storage


@dataclass(frozen=True)
class RowGroup:
    path: str
    row_group: int
    num_rows: int


class ParquetDataset:
    """The row groups of every `*.parquet` file under a URI: from its index (data/index.py) where the index
    lists exactly the files there, else validated from the footers; or from a `description` another
    process made of it (`describe()`: the driver's, handed to every worker), with no storage request."""

    def __init__(
        self,
        uri: str,
        *,
        expected_dim: Optional[int] = None,
        endpoint_url: Optional[str] = None,
        description: Optional[dict] = None,
        image_column: Optional[str] = None,
        cache_bytes: int = 0,
        covariate_columns: tuple[str, ...] = (),
    ):
        """`image_column`: Parquet written elsewhere whose images are encoded PNG/JPEG bytes (data/images.py),
        decoded as row groups are read; by default the column `image` of files without a `pixels` column.
        `cache_bytes`: row groups read are kept in memory, decoded, up to this size (decoded_cache.py).
        `covariate_columns`: the categorical covariates of counts read into each batch (model.covariates)."""
        self.uri, self.image_column, self.decoded = uri, image_column, DecodedRowGroups(cache_bytes)
        self.fs, self.root = storage.resolve(uri, endpoint_url)
        self.units: list[RowGroup] = []
        self.dim = self.shape = self.value_range = None
        self.has_label = True
        # Counts (data/schema.py's sparse layout): a digest of the feature names, and the covariates' categories.
        self.counts, self.features_sha256, self.covariates = False, None, {}
        self.covariate_columns = list(covariate_columns)  # or those of `description`
        if description is None:
            paths = self._list()
            description = self._index_for(paths)
            if description is None:
                for path in paths:
                    self._add_file(path, expected_dim)
        if description is not None:
            self._load(description, expected_dim)
        starts = np.cumsum([0] + [u.num_rows for u in self.units]).tolist()
        self.first_rows, self.num_rows = dict(zip(self.units, starts)), starts[-1]  # in the stored order
        if self.num_rows == 0:
            raise ValueError(f"{uri}: the dataset is empty (0 rows)")
        missing = [c for c in self.covariate_columns if c not in self.covariates]
        if missing:
            held = f"its covariates: {', '.join(self.covariates)}" if self.covariates else "it has none"
            raise ValueError(
                f"{uri} has no covariate {', '.join(map(repr, missing))} ({held}; see prepare --batch-key)"
            )

    def _list(self) -> list[str]:
        if not self.fs.exists(self.root):
            raise FileNotFoundError(f"dataset not found: {self.uri}")
        paths = sorted(p for p in self.fs.find(self.root) if p.endswith(".parquet") and not _hidden(self._relative(p)))
        if not paths:
            raise ValueError(f"{self.uri}: no Parquet files found (run `aevb-dist prepare` to make a dataset)")
        refuse_a_root_of_splits(self.uri, [self._relative(p) for p in paths])
        return paths

    def _index_for(self, paths: list[str]) -> Optional[dict]:
        """The dataset's index where it lists exactly `paths`; None (read the footers) where there is none."""
        index = read_index(self.fs, self.root)
        if index is None:
            return None
        if [name for name, _ in index["files"]] != [self._relative(p) for p in paths]:
            say(
                f"warning: {self.uri}: its index ({INDEX_NAME}) lists other files than the folder holds; "
                "reading the footers instead (prepare the dataset again to refresh it)"
            )
            return None
        return index

    def _relative(self, path: str) -> str:
        return path[len(self.root) :].lstrip("/")

    def check_fits_likelihood(self, likelihood: str, where: str) -> None:
        """A count likelihood reads counts and an image likelihood intensities; then value_range.check_range_fits
        on an image dataset: its recorded value range and, for a Bernoulli model, the brightest pixel of its first
        row group (one read)."""
        if self.counts != (likelihood in names.COUNT_LIKELIHOODS):
            wanted = "a count likelihood" if self.counts else "an image likelihood"
            choices = names.COUNT_LIKELIHOODS if self.counts else names.IMAGE_LIKELIHOODS
            raise ValueError(
                f"{where} holds {'counts' if self.counts else 'images'}, and model.likelihood={likelihood} is not "
                f"{wanted}: choose one of {', '.join(choices)}"
            )
        if self.counts:
            return
        brightest = None
        if likelihood == "bernoulli" and self.units:
            brightest = float(self.to_unit_interval(self.read_raw(self.units[0]).x).max(initial=0.0))
        check_range_fits(self.value_range, brightest, likelihood, where)

    def describe(self) -> dict:
        """What opening the dataset found, as plain values: files in order with their row groups' rows."""
        files: dict[str, list[int]] = {}
        for unit in self.units:
            files.setdefault(self._relative(unit.path), []).append(unit.num_rows)
        return {
            "dim": self.dim,
            "shape": list(self.shape),
            "value_range": None if self.value_range is None else list(self.value_range),
            "has_label": self.has_label,
            "files": [[name, rows] for name, rows in files.items()],
            **(
                {"counts": True, "features_sha256": self.features_sha256, "covariates": self.covariates}
                if self.counts
                else {}
            ),
            **({"image_column": self.image_column} if self.image_column else {}),
            **({"covariate_columns": self.covariate_columns} if self.covariate_columns else {}),
        }

    def _load(self, description: dict, expected_dim: Optional[int]) -> None:
        dim = description["dim"]
        if expected_dim is not None and dim != expected_dim:
            raise ValueError(
                f"{self.uri}: column '{PIXELS}' has width {dim} but the model expects model.input_dim={expected_dim}"
            )
        self.dim, self.shape = dim, list(description["shape"])
        value_range = description["value_range"]  # None for counts
        self.value_range = None if value_range is None else tuple(value_range)
        self.has_label = description["has_label"]
        self.image_column = description.get("image_column")
        self.counts = description.get("counts", False)
        self.features_sha256, self.covariates = description.get("features_sha256"), description.get("covariates", {})
        self.covariate_columns = self.covariate_columns or description.get("covariate_columns", [])
        for name, rows in description["files"]:
            self.units += [RowGroup(f"{self.root}/{name}", i, n) for i, n in enumerate(rows)]

    def _add_file(self, path: str, expected_dim: Optional[int]) -> None:
        try:
            with self.fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path}: not a readable Parquet file ({first_line(err)})") from None
        if PIXELS not in schema.names and (self.image_column or "image") in schema.names:
            return self._add_encoded_file(path, meta, schema, expected_dim)
        if COUNT_INDICES in schema.names:
            return self._add_counts_file(path, meta, schema, expected_dim)
        if PIXELS not in schema.names or INDEX not in schema.names:
            raise ValueError(f"{path}: needs columns '{PIXELS}' and '{INDEX}', found {', '.join(schema.names)}")
        dim = pixel_width(schema.field(PIXELS).type, path)
        if expected_dim is not None and dim != expected_dim:
            raise ValueError(
                f"{path}: column '{PIXELS}' has width {dim} but the model expects model.input_dim={expected_dim}"
            )
        if self.dim is not None and dim != self.dim:
            raise ValueError(f"{path}: width {dim} differs from the other files' width {self.dim}")
        md = schema.metadata or {}
        expected = metadata_checksum(md.get(META_SHAPE, b""), md.get(META_RANGE, b""))
        if META_CHECKSUM in md and md[META_CHECKSUM] != expected:
            raise ValueError(
                f"{path}: its metadata (image shape, value range) does not match its checksum: "
                "the file is corrupted; prepare it again"
            )
        self.dim = dim
        try:
            self.shape = json.loads(md[META_SHAPE]) if META_SHAPE in md else [dim]
            self.value_range = tuple(json.loads(md[META_RANGE])) if META_RANGE in md else (0.0, 1.0)
        except ValueError:
            raise ValueError(f"{path}: its metadata (image shape, value range) is not readable JSON") from None
        self.has_label = self.has_label and LABEL in schema.names
        self.units += [RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]

    def _add_encoded_file(self, path: str, meta, schema, expected_dim: Optional[int]) -> None:
        """A file of encoded images: 8-bit pixels, the shape of its first image, a label column if any."""
        self.image_column = self.image_column or "image"
        if self.shape is None:
            with self.fs.open(path, "rb") as f:
                self.shape = images.describe_encoded_file(pq.ParquetFile(f), path, self.image_column)
            self.dim, self.value_range = int(np.prod(self.shape)), (0.0, 255.0)
        if expected_dim is not None and self.dim != expected_dim:
            raise ValueError(
                f"{path}: images of shape {self.shape} ({self.dim} values) but the model expects "
                f"model.input_dim={expected_dim}"
            )
        self.has_label = self.has_label and LABEL in schema.names
        self.units += [RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]

    def _add_counts_file(self, path: str, meta, schema, expected_dim: Optional[int]) -> None:
        """A file of sparse counts: its features' count and names, covariates' categories (all files alike)."""
        footer = read_counts_footer(path, schema)
        if self.units and (not self.counts or footer != self._counts_footer()):
            raise ValueError(f"{path}: its features or covariates differ from the other files'")
        if expected_dim is not None and footer.dim != expected_dim:
            raise ValueError(
                f"{path}: {footer.dim} features (genes) but the model expects model.input_dim={expected_dim}"
            )
        self.counts, self.dim, self.shape, self.value_range = True, footer.dim, [footer.dim], None
        self.features_sha256, self.covariates = footer.features_sha256, footer.covariates
        self.has_label = self.has_label and LABEL in schema.names
        self.units += [RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]

    def label_names(self) -> Optional[list[str]]:
        """The class each label value stands for, where `prepare` recorded them (image folders, cells)."""
        with self.fs.open(self.units[0].path, "rb") as f:
            names = (pq.ParquetFile(f).schema_arrow.metadata or {}).get(META_LABEL_NAMES)
        return None if names is None else json.loads(names)

    def counts_identity(self) -> Optional[dict]:
        """What a model of counts was trained on, for a checkpoint to check on resume: its genes (a digest of
        their names in order) and covariates' categories. None for images."""
        return {"features_sha256": self.features_sha256, "covariates": self.covariates} if self.counts else None

    def check_counts_identity(self, trained_on: Optional[dict]) -> None:
        """Refuses to resume a run on other genes or covariate categories than `trained_on`, its checkpoint's."""
        if trained_on != self.counts_identity():
            raise ValueError(
                "the training set's genes (their names or order) or covariate categories differ from those the run "
                "was trained on; resume on the same prepared data (or use a new run.name)"
            )

    def _counts_footer(self) -> CountsFooter:
        return CountsFooter(self.dim, self.features_sha256, self.covariates)

    def _read_counts(self, unit: RowGroup) -> Batch:
        columns = [COUNT_INDICES, COUNT_VALUES, INDEX] + [LABEL] * self.has_label + self.covariate_columns
        table = self._read_table(unit, columns)
        where = f"{unit.path} row group {unit.row_group}"
        rows = sparse_rows_of(table, self.dim, where)
        label = table.column(LABEL).to_numpy() if self.has_label else None
        covariates = None
        if self.covariate_columns:
            covariates = np.stack([table.column(c).to_numpy() for c in self.covariate_columns], 1).astype(np.int32)
            sizes = np.array([len(self.covariates[c]) for c in self.covariate_columns])
            if ((covariates < 0) | (covariates >= sizes)).any():
                raise ValueError(f"{where}: a covariate's code lies outside its categories")
        return Batch(rows, table.column(INDEX).to_numpy().astype(np.int64), label, covariates)

    def empty_batch(self) -> Batch:
        """No rows, held as this dataset's rows are (a rank's batch after its rows ran out)."""
        rows = CsrRows.empty(self.dim) if self.counts else np.zeros((0, self.dim), np.float32)
        covariates = np.zeros((0, len(self.covariate_columns)), np.int32) if self.covariate_columns else None
        return Batch(rows, np.zeros(0, np.int64), None, covariates)

    def _read_encoded(self, unit: RowGroup) -> Batch:
        """Decoded as the row group is read (prefetch.py: where); an example's index is its row in the dataset."""
        with self.fs.open(unit.path, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(
                unit.row_group, columns=[self.image_column] + [LABEL] * self.has_label
            )
        raw = images.decode_rows(
            table.column(self.image_column).combine_chunks(),
            self.image_column,
            self.shape,
            f"{unit.path} row group {unit.row_group}",
        )
        first = self.first_rows[unit]
        label = table.column(LABEL).to_numpy().astype(np.int64) if self.has_label else None
        return Batch(raw, np.arange(first, first + len(raw), dtype=np.int64), label)

    def read_raw(self, unit: RowGroup) -> Batch:
        """One row group as stored (uint8 or float), checked against the declared range; read-only arrays."""
        return self.decoded.get(unit, lambda: self._read_stored(unit))

    def _read_stored(self, unit: RowGroup) -> Batch:
        if self.image_column:
            return self._read_encoded(unit)
        if self.counts:
            return self._read_counts(unit)
        table = self._read_table(unit, [PIXELS, INDEX] + ([LABEL] if self.has_label else []))
        pixels = table.column(PIXELS).combine_chunks()
        if pa.types.is_fixed_size_binary(pixels.type):
            data = pixels.buffers()[1]
            raw = np.frombuffer(
                data, dtype=np.uint8, count=len(pixels) * self.dim, offset=pixels.offset * self.dim
            ).reshape(len(pixels), self.dim)
        else:
            raw = pixels.values.to_numpy(zero_copy_only=False).reshape(len(pixels), self.dim)
        self._check_values(raw, unit)
        label = table.column(LABEL).to_numpy() if self.has_label else None
        return Batch(raw, table.column(INDEX).to_numpy().astype(np.int64), label)

    def _read_table(self, unit: RowGroup, columns: list[str]) -> pa.Table:
        """One row group's `columns`, its pages' checksums verified where they were written with them."""
        try:
            with self.fs.open(unit.path, "rb") as f:
                table = pq.ParquetFile(f, page_checksum_verification=True).read_row_group(
                    unit.row_group, columns=columns
                )
            if table.num_rows != unit.num_rows:
                raise OSError(f"{table.num_rows} rows read, {unit.num_rows} in the footer")
        except (pa.ArrowException, OSError) as err:
            raise ValueError(
                f"{unit.path} row group {unit.row_group}: unreadable, the file is corrupted ({first_line(err)})"
            ) from None
        return table

    def to_unit_interval(self, raw: np.ndarray) -> np.ndarray:
        """Stored values → float32 in [0, 1], by the declared value range; counts are read as they are."""
        if self.counts:
            return raw
        lo, hi = self.value_range
        if (lo, hi) == (0.0, 1.0):
            return raw.astype(np.float32, copy=False)
        x = raw.astype(np.float32)
        x -= np.float32(lo)
        x *= np.float32(1.0 / (hi - lo))
        return x

    def is_bytes(self) -> bool:
        """uint8 pixels whose declared range is [0, 255]: binarization can work on the bytes directly."""
        return self.value_range == (0.0, 255.0)

    def read(self, unit: RowGroup) -> Batch:
        """One row group, pixels scaled to [0, 1] and checked."""
        raw = self.read_raw(unit)
        return dataclasses.replace(raw, x=self.to_unit_interval(raw.x))

    def _check_values(self, raw: np.ndarray, unit: RowGroup) -> None:
        """NaN/inf and values outside the declared range are errors; uint8 in [0, 255] needs no pass."""
        lo, hi = self.value_range
        if raw.dtype == np.uint8 and lo <= 0.0 and hi >= 255.0 or raw.size == 0:
            return
        where = f"{unit.path} row group {unit.row_group}"
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            raise ValueError(f"{where}: NaN or inf pixel values")
        low, high = raw.min(), raw.max()
        if low < lo or high > hi:
            raise ValueError(
                f"{where}: values outside the declared range {list(self.value_range)} "
                f"(found [{low:.4g}, {high:.4g}]); the reader scales that range to [0, 1]"
            )


def _hidden(relative_path: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative_path.split("/"))
