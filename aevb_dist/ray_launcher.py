"""Moved: `train` is `aevb_dist.train.driver.train`; this path stays importable for code written against it."""

from aevb_dist.train.driver import train  # noqa: F401
