"""The datasets a run trains and tests on, opened from its config. No Ray here."""

from __future__ import annotations

from typing import Optional

from aevb_dist.config import Config
from aevb_dist.data.reader import ParquetDataset


def open_datasets(
    cfg: Config, train_description: Optional[dict] = None
) -> tuple[ParquetDataset, Optional[ParquetDataset]]:
    """The training and test sets; the training set from `train_description` (the driver's) where given."""
    endpoint = cfg.run.s3_endpoint_url
    if not cfg.data.train_uri:
        raise ValueError("data.train_uri is empty; point it at a dataset made by `aevb-dist prepare`")
    # data.cache_on_device holds the training set on the device already: no second copy in host memory.
    cache_mib = 0 if cfg.data.cache_on_device else cfg.data.decoded_cache_mib
    train = ParquetDataset(
        cfg.data.train_uri,
        expected_dim=cfg.model.input_dim,
        endpoint_url=endpoint,
        description=train_description,
        image_column=cfg.data.image_column,
        cache_bytes=cache_mib << 20,
    )
    test = (
        ParquetDataset(
            cfg.data.test_uri,
            expected_dim=cfg.model.input_dim,
            endpoint_url=endpoint,
            image_column=cfg.data.image_column,
        )
        if cfg.data.test_uri
        else None
    )
    return train, test
