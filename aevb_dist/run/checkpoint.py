"""Training state to and from checkpoint folders, with a manifest that resume verifies.

A checkpoint folder holds `state.pt` (model, optimizer, step, epoch, data position,
samples seen) and `manifest.json` (its size and sha256, and the step). The manifest is
written last: a folder without one, or whose `state.pt` does not match it, is not a
checkpoint, so an upload cut off part way is never resumed from.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from typing import Any, Optional

import torch

from aevb_dist.config.checks import same_image_shape
from aevb_dist.console import first_line, say
from aevb_dist.run import storage

STATE, MANIFEST = "state.pt", "manifest.json"
FORMAT_VERSION = 1


def save(folder: str, state: dict, config: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, "config": config, **state}, buffer)
    payload = buffer.getvalue()
    with open(os.path.join(folder, STATE), "wb") as f:
        f.write(payload)
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": state["state"]["step"],
        "file": STATE,
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "model": config.get("model", {}),
        # A global-batch run's data.num_partitions and train.global_batch_size (None for other runs): the driver
        # counts a resumed run's steps over them before any worker loads the state.
        "partitioning": state.get("partitioning"),
    }
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f)


def state_nbytes(state) -> int:
    """The bytes of the tensors in a state (what its checkpoint's size is made of)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def _read(fs, path: str) -> Optional[bytes]:
    try:
        return fs.cat_file(path)
    except (OSError, FileNotFoundError):
        return None


def _verified_payload(fs, folder: str) -> tuple[Optional[bytes], Optional[str]]:
    """(the payload the manifest vouches for, None), or (None, why `folder` is not a complete checkpoint):
    one read of each file, so a load does not download the state twice."""
    raw = _read(fs, f"{folder}/{MANIFEST}")
    try:
        manifest = json.loads(raw) if raw is not None else None
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or "sha256" not in manifest:
        return None, "no readable manifest.json (an incomplete write)"
    payload = _read(fs, f"{folder}/{manifest.get('file', STATE)}")
    if payload is None:
        return None, f"{manifest.get('file')} is missing"
    if len(payload) != manifest["size"] or hashlib.sha256(payload).hexdigest() != manifest["sha256"]:
        return None, f"{manifest['file']} does not match its checksum (a partial or corrupted write)"
    return payload, None


def verify(fs, folder: str) -> Optional[str]:
    """None when `folder` (on fsspec filesystem `fs`) is a complete checkpoint, else why not."""
    return _verified_payload(fs, folder)[1]


def verified_state_bytes(fs, folder: str, where: Optional[str] = None) -> bytes:
    """`state.pt`'s bytes, checked against the manifest; a ValueError naming `where` (or the folder) if not."""
    payload, problem = _verified_payload(fs, folder)
    if problem:
        raise ValueError(f"checkpoint {where or folder} is not usable: {problem}")
    return payload


def load(fs, folder: str, map_location: str = "cpu") -> dict:
    return unpickle_state(verified_state_bytes(fs, folder), folder, map_location)


def unpickle_state(state_bytes: bytes, where: str, map_location: str = "cpu") -> dict:
    """`state.pt`'s contents, read as data only: tensors, numbers, strings, lists and dicts. A pickle
    that asks for anything else (a function to call: a checkpoint planted to run code) is refused
    before any of it runs. The manifest's checksum proves a file whole, not who wrote it."""
    try:
        return torch.load(io.BytesIO(state_bytes), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(err))
        asks = f"it asks for {found.group(1)}" if found else first_line(err)
        raise ValueError(
            f"checkpoint {where or STATE} holds more than tensors and plain values ({asks}); "
            "not loaded, since loading it could run code"
        ) from None


def read_manifest(fs, folder: str) -> dict:
    return json.loads(fs.cat_file(f"{folder}/{MANIFEST}"))


def manifest_step(fs, folder: str) -> int:
    return int(read_manifest(fs, folder)["step"])


def check_fits(model_now: dict, model_saved: Optional[dict], run_uri: str, name: str) -> None:
    """Whether checkpoint `name` of the run at `run_uri`, whose manifest recorded `model_saved` (its model.*
    settings), is the model `model_now` describes: refused in one line naming each setting that differs.
    The initializations (init_std, init, output_bias_init) only shaped the first step; an input_shape left
    unset (None: the data's) or written with or without its one channel is the same shape. A manifest without
    model.* (older) fits: the parameters' shapes are checked as they load (Trainer.load_state_dict). The data
    position is BatchSource.resumed's to check."""
    if not model_saved:
        return
    changed = [
        f"model.{key}: {model_saved[key]} in {name}, {model_now[key]} now"
        for key in model_now
        if key in model_saved and not _same_setting(key, model_saved[key], model_now[key])
    ]
    if changed:
        raise ValueError(
            f"{run_uri} holds a checkpoint of a different model ({'; '.join(changed)}); "
            "use another run.name, or the model settings it was trained with"
        )


def _same_setting(key: str, saved, now) -> bool:
    if key in ("init_std", "init", "output_bias_init") or saved == now:
        return True
    return key == "input_shape" and (saved is None or same_image_shape(saved, now))


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:010d}"


def _names_newest_first(fs, run_path: str) -> list[str]:
    if not fs.exists(run_path):
        return []
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(run_path, detail=False))
    return sorted((n for n in names if n.startswith("checkpoint_") and n[len("checkpoint_") :].isdigit()), reverse=True)


def latest(fs, run_path: str, warn=None) -> Optional[str]:
    """The newest complete checkpoint folder under a run folder; incomplete ones are skipped with a warning."""
    for name in _names_newest_first(fs, run_path):
        problem = verify(fs, f"{run_path}/{name}")
        if problem is None:
            return f"{run_path}/{name}"
        if warn is not None:
            warn(f"skipping {name}: {problem}")
    return None


def upload(folder: str, fs, dest: str) -> None:
    """Copy a folder written by `save` to `dest` on `fs`. The manifest goes last (and an old one at
    `dest` is removed first), so until the copy is whole, `dest` is not a checkpoint."""
    fs.makedirs(dest, exist_ok=True)
    if fs.exists(f"{dest}/{MANIFEST}"):
        fs.rm(f"{dest}/{MANIFEST}")
    fs.put_file(os.path.join(folder, STATE), f"{dest}/{STATE}")
    fs.put_file(os.path.join(folder, MANIFEST), f"{dest}/{MANIFEST}")


def prune(fs, run_path: str, keep: int) -> list[str]:
    """Remove every checkpoint folder older than the newest `keep` complete ones; the names removed."""
    names, complete = _names_newest_first(fs, run_path), 0
    for i, name in enumerate(names):
        if complete == keep:
            for old in names[i:]:
                fs.rm(f"{run_path}/{old}", recursive=True)
            return names[i:]
        complete += verify(fs, f"{run_path}/{name}") is None
    return []


# -- opening a checkpoint given by URI (evaluate, encode, plot, variance) -------------------------
def find_checkpoint(uri: str, endpoint_url: Optional[str] = None) -> tuple[object, str]:
    """(filesystem, folder) of a checkpoint folder, or of a run folder's newest complete checkpoint."""
    fs, path = storage.resolve(uri, endpoint_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {uri}")
    if fs.exists(f"{path}/{MANIFEST}"):
        return fs, path
    newest = latest(fs, path, warn=lambda m: say(f"warning: {m}"))
    if newest is None:
        raise ValueError(f"{uri}: neither a checkpoint folder nor a run folder holding a complete checkpoint")
    return fs, newest


def load_checkpoint_bytes(uri: str, endpoint_url: Optional[str] = None) -> tuple[bytes, str]:
    """The verified bytes of `state.pt` (small enough to ship to Ray tasks whole) and its folder."""
    fs, folder = find_checkpoint(uri, endpoint_url)
    return verified_state_bytes(fs, folder, uri), folder
