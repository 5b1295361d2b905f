"""`aevb-dist train` on the driver: everything a run does before and after its workers, whichever
launcher starts them (`ray_launcher` on a Ray cluster or the embedded Ray, `local_launcher` for
`ray.local_mode=true`). Resume is the same under both: a rerun with the same `run.storage_uri`
and `run.name` continues from the newest complete checkpoint in the run folder.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from aevb_dist import checkpoint, compat, storage
from aevb_dist.config import Config, absolute_local_uris, to_dict, to_yaml
from aevb_dist.console import first_line, say
from aevb_dist.data.statistics import mean_intensity
from aevb_dist.data.value_range import check_range_fits
from aevb_dist.model.vae import VAE
from aevb_dist.run_lease import LeaseHeld, RunLease
from aevb_dist.run_log import ProgressPrinter, read_metrics
from aevb_dist.train import stop_request
from aevb_dist.train.batches import BatchSource
from aevb_dist.train.datasets import open_datasets
from aevb_dist.train.local_launcher import launch_local
from aevb_dist.train.ray_launcher import launch_on_ray


def train(cfg: Config, wait_for_lease: bool = True) -> dict:
    """Run (or resume) training; returns the last row of metrics.csv. A run held by a driver on another
    machine whose heartbeat stopped is waited for (`wait_for_lease`) or refused."""
    cfg = absolute_local_uris(cfg)
    train_data, _ = open_datasets(cfg)  # fail fast, before any worker starts
    check_range_fits(train_data, cfg.model.likelihood, cfg.data.train_uri)
    cfg = model_for_data(cfg, train_data.shape)
    if storage.scheme_of(cfg.run.storage_uri) == "memory":
        raise ValueError(
            "run.storage_uri=memory://... is private to one process; workers cannot share it. Use a local path or s3://"
        )
    run = storage.run_folder(cfg.run)
    lease = _claim_run_folder(cfg, run, wait_for_lease)
    try:
        # Steps from the config's partitions; a resumed run keeps its recorded ones (the workers count those).
        steps = BatchSource(
            cfg, train_data, rank=0, world_size=cfg.train.num_workers, binarization="none", device=None
        ).total_steps()
        start_step = _announce_resume(cfg, run, steps)
        if start_step < steps:
            launch = launch_local if cfg.ray.local_mode else launch_on_ray
            stop_request.clear(run)  # one left by an earlier run is not this run's
            try:
                data_mean = _data_mean(cfg, train_data) if start_step == 0 else None
                with ProgressPrinter(run, steps, start_step), stop_request.maybe_stop_on_signals(run):
                    launch(cfg, run, train_data, data_mean)
            finally:
                try:
                    stop_request.clear(run)
                except Exception:  # storage unreachable (the run's own error says so): the next run clears it
                    pass
    finally:
        lease.release()
    rows = read_metrics(run.fs, run.file("metrics.csv"))
    last = rows[-1] if rows else {}
    if start_step < steps and last.get("step", 0) < steps:
        say(
            f"stopped at step {last.get('step', 0)} of {steps}, with a checkpoint of it in {run.uri}; "
            "run the same command again to resume"
        )
    elif start_step < steps:
        say(f"done: {run.uri} (step {last.get('step', 0)}, test ELBO {last.get('test_elbo', float('nan')):.2f})")
    return last


def _data_mean(cfg: Config, train_data) -> Optional[list[float]]:
    """model.output_bias_init=data_mean: the training set's mean pixel, read once here for every worker."""
    if cfg.model.output_bias_init != "data_mean":
        return None
    say(f"model.output_bias_init=data_mean: the mean pixel of {train_data.num_rows:,} training examples")
    return mean_intensity(train_data).tolist()


def model_for_data(cfg: Config, data_shape: list[int]) -> Config:
    """model.input_shape from the training data when unset, refused in one line when it differs; then the
    networks are built once here, so that a factory that does not import, or returns the wrong shapes, or a
    conv network too deep for the images, stops the run before any worker starts."""
    m = cfg.model
    if m.input_shape is None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, input_shape=list(data_shape)))
    elif _squeezed(m.input_shape) != _squeezed(data_shape):
        raise ValueError(
            f"model.input_shape={list(m.input_shape)} differs from the training data's shape "
            f"{list(data_shape)} ({cfg.data.train_uri})"
        )
    VAE.from_config(cfg.model)
    return cfg


def _same_setting(key: str, saved, now) -> bool:
    """The initializations (init_std, init, output_bias_init) only shaped the first step; an input_shape the
    checkpoint left unset (None: the data's) or wrote with/without its one channel is the same shape."""
    if key in ("init_std", "init", "output_bias_init") or saved == now:
        return True
    return key == "input_shape" and (saved is None or _squeezed(saved) == _squeezed(now))


def _squeezed(shape) -> list[int]:
    """[1, H, W] is [H, W]: one channel."""
    return list(shape)[1:] if len(shape) == 3 and shape[0] == 1 else list(shape)


def _stop_main_thread(reason: str) -> None:
    """The lease was lost (another driver took the run over): stop training, as Ctrl-C would."""
    say(reason)
    compat.interrupt_main_thread()


def _claim_run_folder(cfg: Config, run: storage.Folder, wait_for_lease: bool) -> RunLease:
    """The run's lease (one writer per run), then its config.yaml; storage errors are one line."""
    try:
        lease = RunLease(run, cfg.run.lease_timeout_s, on_lost=_stop_main_thread, wait=wait_for_lease)
        lease.acquire()
    except LeaseHeld:
        raise
    except Exception as err:
        raise _storage_error(cfg, err) from None
    try:
        run.fs.makedirs(run.path, exist_ok=True)
        run.fs.pipe_file(run.file("config.yaml"), to_yaml(cfg).encode())
    except Exception as err:
        lease.release()
        raise _storage_error(cfg, err) from None
    return lease


def _storage_error(cfg: Config, err: Exception) -> ValueError:
    if isinstance(err, OSError):  # PermissionError included
        return ValueError(
            f"cannot write to run.storage_uri {cfg.run.storage_uri}: {type(err).__name__}: {first_line(err)}"
        )
    # botocore's endpoint and credential errors have no common base we import
    return ValueError(f"cannot reach run.storage_uri {cfg.run.storage_uri}: {type(err).__name__}: {first_line(err)}")


def _announce_resume(cfg: Config, run: storage.Folder, steps: int) -> int:
    """The step the run resumes from (0 for a new run), said aloud."""
    newest = checkpoint.latest(run.fs, run.path, warn=lambda m: say(f"warning: {m}"))
    if newest is None:
        return 0
    manifest = checkpoint.read_manifest(run.fs, newest)
    step, name = int(manifest["step"]), newest.rsplit("/", 1)[-1]
    _check_same_model(cfg, run, manifest.get("model"), name)
    if step >= steps:
        say(
            f"{run.uri} is already at step {step} of {steps} ({name}); nothing to train. "
            "Raise train.max_steps or train.num_epochs to continue"
        )
    else:
        say(f"resuming {cfg.run.name} from {name} (step {step} of {steps})")
    return step


def _check_same_model(cfg: Config, run: storage.Folder, saved_model: Optional[dict], name: str) -> None:
    if not saved_model:
        return
    current = to_dict(cfg)["model"]
    changed = [
        f"model.{k}: {saved_model[k]} in {name}, {current[k]} now"
        for k in current
        if k in saved_model and not _same_setting(k, saved_model[k], current[k])
    ]
    if changed:
        raise ValueError(
            f"{run.uri} holds a checkpoint of a different model ({'; '.join(changed)}); "
            "use another run.name, or the model settings it was trained with"
        )
