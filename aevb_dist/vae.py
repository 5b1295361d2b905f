"""Moved to `aevb_dist.model.vae`; this path stays importable for code written against it."""

from aevb_dist.model.vae import *  # noqa: F401,F403
