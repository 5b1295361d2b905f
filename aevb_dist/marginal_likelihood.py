"""Moved to `aevb_dist.model.marginal_likelihood`; this path stays importable for code written against it."""

from aevb_dist.model.marginal_likelihood import *  # noqa: F401,F403
