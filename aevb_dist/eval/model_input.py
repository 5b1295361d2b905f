"""The tensor a model reads from rows read on the host: dense rows copied, sparse rows (counts) made dense on
the device itself, and the codes of the covariates the model conditions on appended as its last columns
(model/vae.py splits them off). Used by training's step and by evaluation alike."""

from __future__ import annotations

import numpy as np
import torch

from aevb_dist.data.schema import Batch
from aevb_dist.data.sparse_rows import Rows


def to_device(x: Rows, device: torch.device) -> torch.Tensor:
    """The rows as a dense float tensor [rows, D] on `device`: a dense array copied (asynchronously from
    pinned memory); sparse rows sent as (flat position, value) pairs and scattered into zeros there."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x).to(device, non_blocking=True)
    rows, dim = x.shape
    dense = torch.zeros(rows * dim, dtype=torch.float32, device=device)
    if x.values.size:
        row_of_entry = np.repeat(np.arange(rows, dtype=np.int64), np.diff(x.indptr))
        flat = torch.from_numpy(row_of_entry * dim + x.indices).to(device, non_blocking=True)
        # torch.tensor copies: the values may be a read-only view of the decoded cache's row group.
        dense.index_put_((flat,), torch.tensor(x.values).to(device, non_blocking=True))
    return dense.view(rows, dim)


def model_input(batch: Batch, device: torch.device) -> torch.Tensor:
    """[rows, D] (+ C covariate columns, their codes as floats, where the batch carries covariates)."""
    x = to_device(batch.x, device)
    if batch.covariates is None:
        return x
    return torch.cat([x, torch.from_numpy(batch.covariates).to(device, non_blocking=True).float()], 1)
