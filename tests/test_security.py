"""Secure defaults: a checkpoint is data, never code, whoever wrote it."""

import hashlib
import io
import json
import os

import pytest
import torch

from aevb_dist.config import load_config, to_dict
from aevb_dist.eval import saved_model
from aevb_dist.run import checkpoint, storage
from aevb_dist.run.metrics import COLUMNS
from aevb_dist.train.worker import trainer_for_config
from tests.helpers import SMOKE, aevb, tiny_overrides


class RunsACommand:
    """What a planted pickle holds: unpickling it freely runs `command` (os.system)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def plant_checkpoint(tiny_data: str, storage_uri: str, marker: str, step: int = 4) -> str:
    """A run folder whose newest checkpoint is a real one plus a payload that would create `marker`,
    with a manifest that verifies (size, sha256, step, model) and a metrics row: every check but the
    one on what the pickle may hold passes. Returns the run folder."""
    cfg = load_config(SMOKE, tiny_overrides(tiny_data, storage_uri) + ["run.name=planted"])
    state = {
        "format_version": checkpoint.FORMAT_VERSION,
        "config": to_dict(cfg),
        **trainer_for_config(cfg).state_dict(),
        "payload": RunsACommand(f"touch {marker}"),
    }
    state["state"]["step"] = step
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    run = storage.run_folder(cfg.run)
    folder = run.file(checkpoint.checkpoint_name(step))
    os.makedirs(folder)
    with open(os.path.join(folder, checkpoint.STATE), "wb") as f:
        f.write(payload)
    with open(os.path.join(folder, checkpoint.MANIFEST), "w") as f:
        json.dump(
            {
                "format_version": checkpoint.FORMAT_VERSION,
                "step": step,
                "file": checkpoint.STATE,
                "size": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
                "model": to_dict(cfg)["model"],
            },
            f,
        )
    with open(run.file("metrics.csv"), "w") as f:
        f.write(",".join(COLUMNS) + "\n" + f"{step},0,32,-10.0,,100.0,0,0\n")
    assert checkpoint.verify(run.fs, folder) is None  # a manifest that matches: integrity is not the issue
    return run.path


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_by_every_loader(tiny_data, tmp_path):
    marker = tmp_path / "ran"
    run = plant_checkpoint(tiny_data, str(tmp_path), str(marker))
    fs, folder = checkpoint.find_checkpoint(run)
    with pytest.raises(ValueError, match=r"holds more than tensors and plain values \(it asks for posix.system\)"):
        checkpoint.load(fs, folder)
    with pytest.raises(ValueError, match="not loaded, since loading it could run code"):
        saved_model.model_from_bytes(*checkpoint.load_checkpoint_bytes(run))
    assert not marker.exists()


@pytest.mark.parametrize("command", ["evaluate", "encode", "plot", "variance"])
def test_commands_refuse_a_code_running_checkpoint_in_one_line(tiny_data, tmp_path, command):
    marker = tmp_path / "ran"
    run = plant_checkpoint(tiny_data, str(tmp_path), str(marker))
    args = {
        "evaluate": [run, f"{tiny_data}/test", "-k", "2"],
        "encode": [run, f"{tiny_data}/test", str(tmp_path / "codes")],
        "plot": [run],
        "variance": [run, f"{tiny_data}/test", "--num-draws", "2"],
    }[command]
    proc = aevb(command, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "could run code" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()


@pytest.mark.slow  # local-mode worker processes
def test_resuming_from_a_code_running_checkpoint_is_refused_in_one_line(tiny_data, tmp_path):
    marker = tmp_path / "ran"
    plant_checkpoint(tiny_data, str(tmp_path), str(marker))
    proc = aevb(
        "train",
        SMOKE,
        *tiny_overrides(tiny_data, str(tmp_path)),
        "run.name=planted",
        "train.max_steps=8",
        "ray.local_mode=true",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "could run code" in errors[0], proc.stderr[-2000:]
    assert not marker.exists()
