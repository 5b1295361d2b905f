"""Every seed rule in one place: what each random draw is a function of.

Each rule maps the run's `seed` and the draw's coordinates to a seed (an int for torch.Generator.manual_seed,
or an entropy list for numpy.random.default_rng). A draw that depends only on its coordinates, never on
which worker makes it or when, is what makes results independent of the worker count and a resumed run
identical to an uninterrupted one. Plain integers: the model layer (torch) and the data layer (numpy)
both use these rules.
"""

from __future__ import annotations

ELBO, LOG_PX = "elbo", "log_px"
# Far above any seed * 7_919 + row group * 104_729 this project meets: the log p(x) stream of a row group
# never meets an ELBO stream.
_LOG_PX_OFFSET = 1 << 62


def step_seed(seed: int, step: int, stream: int) -> int:
    """Training step `step`'s noise ε on rank `stream` (or, in a global-batch run, on data partition `stream`):
    a resumed run draws what an uninterrupted one does."""
    return (seed * 1_000_003 + step) * 4099 + stream


def row_group_seed(seed: int, row_group: int, draw: str = ELBO) -> int:
    """An evaluated row group's noise, for the ELBO or for the log p(x) estimate: the same on any worker, in
    training's test-set evaluation and in `aevb-dist evaluate`, and the ELBO's whatever the number of
    importance samples."""
    if draw not in (ELBO, LOG_PX):
        raise ValueError(f"draw={draw!r} is not one of: {ELBO}, {LOG_PX}")
    return seed * 7_919 + row_group * 104_729 + 17 + (_LOG_PX_OFFSET if draw == LOG_PX else 0)


def epoch_order_seed(seed: int, epoch: int) -> list[int]:
    """The order in which an epoch deals row groups to ranks (or partitions)."""
    return [seed, epoch]


def window_seed(seed: int, epoch: int, first_row_group: int) -> list[int]:
    """The shuffle of one reader window's rows, named by the window's first row group."""
    return [seed, epoch, first_row_group, 1]


def binarization_key(seed: int, epoch: int, per_epoch: bool) -> int:
    """The key of the binarization hash (data/binarization.py, and on the device train/device_data.py):
    one per epoch (`dynamic`) or one for the run (`static`)."""
    return (seed + 1) * 1_000_003 + (epoch + 1 if per_epoch else 0)


def split_seed(seed: int) -> int:
    """`prepare`'s train/test split of a source without one."""
    return seed


def storage_order_seed(seed: int, split: int) -> list[int]:
    """`prepare`'s random order of a count matrix's split (`split`: its position in names.SPLITS)."""
    return [seed, split, 2]


def gradient_draw_seed(seed: int, draw: int) -> int:
    """The `variance` command's draw `draw` of the minibatch gradient."""
    return seed * 1_000_003 + draw
