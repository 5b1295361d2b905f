"""The datasets a run trains and tests on, opened from its config, and what one rank reads of the training set.
No Ray here."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch

from aevb_dist.config.schema import Config, ModelConfig
from aevb_dist.data.binarization import train_binarization
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.train.batches import BatchSource
from aevb_dist.train.device_data import DeviceData
from aevb_dist.train.device_stream import streamed_to


def open_datasets(
    cfg: Config, train_description: Optional[dict] = None
) -> tuple[ParquetDataset, Optional[ParquetDataset]]:
    """The training and test sets; the training set from `train_description` (the driver's) where given."""
    endpoint = cfg.run.s3_endpoint_url
    if not cfg.data.train_uri:
        raise ValueError("data.train_uri is empty; point it at a dataset made by `aevb-dist prepare`")
    # data.cache_on_device holds the training set on the device already: no second copy in host memory.
    cache_mib = 0 if cfg.data.cache_on_device else cfg.data.decoded_cache_mib
    with _named("data.train_uri"):
        train = ParquetDataset(
            cfg.data.train_uri,
            expected_dim=cfg.model.input_dim,
            endpoint_url=endpoint,
            description=train_description,
            image_column=cfg.data.image_column,
            cache_bytes=cache_mib << 20,
            covariate_columns=tuple(cfg.model.covariates),
        )
    if not cfg.data.test_uri:
        return train, None
    with _named("data.test_uri"):
        test = ParquetDataset(
            cfg.data.test_uri,
            expected_dim=cfg.model.input_dim,
            endpoint_url=endpoint,
            image_column=cfg.data.image_column,
            covariate_columns=tuple(cfg.model.covariates),
        )
    return train, test


def with_covariate_sizes(model_cfg: ModelConfig, train_data: ParquetDataset) -> ModelConfig:
    """model.covariate_sizes from the training data's categories of model.covariates where unset; refused in
    one line where set otherwise."""
    sizes = [len(train_data.covariates[name]) for name in model_cfg.covariates]
    if model_cfg.covariate_sizes is None:
        return dataclasses.replace(model_cfg, covariate_sizes=sizes) if sizes else model_cfg
    if list(model_cfg.covariate_sizes) != sizes:
        raise ValueError(
            f"model.covariate_sizes={list(model_cfg.covariate_sizes)} differs from the training data's {sizes} "
            f"categories of model.covariates={list(model_cfg.covariates)}"
        )
    return model_cfg


@contextlib.contextmanager
def _named(key: str) -> Iterator[None]:
    """A dataset refused for what its folder holds is told with the config key that named it."""
    try:
        yield
    except ValueError as err:
        if type(err) is not ValueError:  # a kind of its own (storage unavailable, ...): as it is
            raise
        raise ValueError(f"{key}: {err}") from None


def rank_data(
    cfg: Config, *, rank: int, world_size: int, device: torch.device, train_description: Optional[dict] = None
) -> tuple[BatchSource, Optional[ParquetDataset]]:
    """What rank `rank` of `world_size` trains and tests on: its batches of the training set (opened from
    `train_description`, the driver's, where given) and the test set."""
    train_data, test_data = open_datasets(cfg, train_description)
    return batch_source_for(cfg, train_data, rank=rank, world_size=world_size, device=device), test_data


def batch_source_for(
    cfg: Config, train_data: ParquetDataset, *, rank: int, world_size: int, device: torch.device
) -> BatchSource:
    """The batches rank `rank` of `world_size` trains on: from the training set held on the device
    (data.cache_on_device), or read from storage, windows binarized on the device where it is a GPU."""
    binarization = train_binarization(cfg.model.likelihood, cfg.data.binarization)
    if train_data.counts and cfg.data.cache_on_device:
        raise ValueError(
            "data.cache_on_device=true holds dense images; a dataset of counts streams, each batch made dense on "
            "the device: unset data.cache_on_device"
        )
    # Counts are made dense on the device batch by batch (eval/model_input.py), not in device windows.
    streamed = not (train_data.counts or cfg.data.cache_on_device)
    windows = streamed_to(device, train_data, cfg.data, binarization, cfg.seed) if streamed else None
    device_data = DeviceData(train_data, device, binarization, cfg.seed) if cfg.data.cache_on_device else None
    return BatchSource(
        train_data,
        train_cfg=cfg.train,
        data_cfg=cfg.data,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        binarization=binarization,
        device=device,
        device_data=device_data,
        device_windows=windows,
    )
