"""The trained model a checkpoint holds, built from its config and loaded with its weights; a model built by
a user's factory only where the user trusts that factory."""

from __future__ import annotations

import os

from aevb_dist.config import config_from_dict
from aevb_dist.data.binarization import eval_binarization
from aevb_dist.model.hierarchical import model_from_config
from aevb_dist.model.vae import VAE
from aevb_dist.run.checkpoint import unpickle_state

# Names of a user's network factories ("package.module:function", comma-separated) that a checkpoint may name.
TRUSTED_ARCHITECTURES_ENV = "AEVB_TRUSTED_ARCHITECTURES"


def model_from_bytes(state_bytes: bytes, where: str = "", architecture_checked: bool = False) -> tuple[VAE, dict]:
    """The trained model held by `state.pt`'s bytes, and everything saved with it. A model built by a user's
    factory is refused unless $AEVB_TRUSTED_ARCHITECTURES names it (`architecture_checked`: a caller that
    checked these very bytes already, e.g. on the driver before its Ray tasks)."""
    saved = unpickle_state(state_bytes, where)
    model_cfg = config_from_dict(saved["config"]).model
    if not architecture_checked:
        check_trusted_architecture(model_cfg.architecture, where)
    vae = model_from_config(model_cfg)
    vae.load_state_dict(saved["model"])
    return vae, saved


def check_trusted_architecture(architecture: str, where: str) -> None:
    """Building a checkpoint's model imports and calls the function its config names: a checkpoint from
    elsewhere could name any importable code. Weights are loaded without code (`unpickle_state`); so is this."""
    if architecture in ("mlp", "conv"):
        return
    trusted = [a.strip() for a in os.environ.get(TRUSTED_ARCHITECTURES_ENV, "").split(",") if a.strip()]
    if architecture not in trusted:
        raise ValueError(
            f"{where or 'the checkpoint'}: its model is built by {architecture!r}, code that is imported "
            f"and run by name; if you trust it, set {TRUSTED_ARCHITECTURES_ENV}={architecture}"
        )


def saved_eval_binarization(vae: VAE, saved: dict) -> str:
    """How evaluation data is binarized for a checkpoint's model (`eval_binarization` of its config)."""
    return eval_binarization(vae.likelihood.name, saved["config"]["data"]["binarization"])
