"""Seeded synthetic single-cell atlases for tests and benchmarks: negative-binomial counts from planted cell
types and batch effects, written as .h5ad, a 10x folder and a scipy.sparse .npz by the tests themselves."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
from scipy import io, sparse


@dataclass
class Atlas:
    counts: sparse.csr_matrix  # cells × genes, int
    cell_type: np.ndarray  # [N] str
    batch: np.ndarray  # [N] str
    genes: list[str]


def synthetic_atlas(
    num_cells=600, num_genes=50, num_types=3, num_batches=2, seed=0, sort_by_type=False, mean_library=400
) -> Atlas:
    rng = np.random.default_rng(seed)
    types = rng.integers(num_types, size=num_cells)
    if sort_by_type:
        types = np.sort(types)
    batches = rng.integers(num_batches, size=num_cells)
    profile = rng.gamma(0.6, 1.0, size=(num_types, num_genes))  # each type's mean expression per gene
    batch_effect = rng.lognormal(0.0, 0.3, size=(num_batches, num_genes))
    library = rng.lognormal(np.log(mean_library), 0.3, size=num_cells)
    rate = profile[types] * batch_effect[batches]
    mean = library[:, None] * rate / rate.sum(1, keepdims=True)
    theta = 2.0
    counts = rng.negative_binomial(theta, theta / (theta + mean))
    return Atlas(
        sparse.csr_matrix(counts.astype(np.int32)),
        np.array([f"type_{t}" for t in types]),
        np.array([f"batch_{b}" for b in batches]),
        [f"GENE{g:04d}" for g in range(num_genes)],
    )


def write_h5ad(
    atlas: Atlas, path: str, layer: str | None = "counts", x_float: bool = True, matrix_format: str = "csr"
) -> str:
    """An AnnData file as an analysis leaves it: log-normalized floats in X, raw counts in `layer`, each stored
    as `matrix_format` (csr or csc)."""
    import anndata
    import pandas as pd

    normalized = atlas.counts.astype(np.float32).multiply(1e4 / atlas.counts.sum(1)).tocsr()
    normalized.data = np.log1p(normalized.data)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(atlas.cell_type), "donor": pd.Categorical(atlas.batch)},
        index=[f"cell{i}" for i in range(atlas.counts.shape[0])],
    )
    stored = sparse.csc_matrix if matrix_format == "csc" else sparse.csr_matrix
    adata = anndata.AnnData(
        X=stored(normalized if x_float else atlas.counts), obs=obs, var=pd.DataFrame(index=atlas.genes)
    )
    if layer:
        adata.layers[layer] = stored(atlas.counts)
    adata.write_h5ad(path)
    return path


def write_10x(atlas: Atlas, folder: str, entry_order: str = "barcode") -> str:
    """A Cell Ranger output folder. Its matrix.mtx.gz as Cell Ranger writes it: a metadata comment under the
    banner, entries barcode by barcode; `entry_order="feature"`: scipy's mmwrite of a CSR genes × cells matrix,
    whose entries come gene by gene."""
    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(folder, "matrix.mtx.gz"), "wb") as f:
        if entry_order == "feature":
            io.mmwrite(f, sparse.csr_matrix(atlas.counts.T), field="integer")
        else:
            write_cellranger_mtx(atlas.counts, f)
    with gzip.open(os.path.join(folder, "features.tsv.gz"), "wt") as f:
        f.writelines(f"{g}\t{g.lower()}\tGene Expression\n" for g in atlas.genes)
    with gzip.open(os.path.join(folder, "barcodes.tsv.gz"), "wt") as f:
        f.writelines(f"AAAC{i:08d}-1\n" for i in range(atlas.counts.shape[0]))
    return folder


def write_cellranger_mtx(counts: sparse.csr_matrix, f) -> None:
    """cells × genes `counts` as Cell Ranger's features × barcodes MatrixMarket file, entries barcode by barcode."""
    coo = counts.tocoo()
    order = np.lexsort((coo.col, coo.row))
    f.write(b"%%MatrixMarket matrix coordinate integer general\n")
    f.write(b'%metadata_json: {"software_version": "cellranger-7.1.0", "format_version": 2}\n')
    f.write(f"{counts.shape[1]} {counts.shape[0]} {coo.nnz}\n".encode())
    lines = np.stack([coo.col[order] + 1, coo.row[order] + 1, coo.data[order]], axis=1)
    f.write("".join(f"{g} {c} {v}\n" for g, c, v in lines.tolist()).encode())


def write_npz(atlas: Atlas, path: str, matrix_format: str = "csr") -> str:
    import pandas as pd

    sparse.save_npz(path, atlas.counts.asformat(matrix_format))
    pd.DataFrame({"cell_type": atlas.cell_type, "donor": atlas.batch}).to_csv(
        path[: -len(".npz")] + ".obs.csv", index=False
    )
    return path
