"""Moved to `aevb_dist.model.elbo`; this path stays importable for code written against it."""

from aevb_dist.model.elbo import *  # noqa: F401,F403
