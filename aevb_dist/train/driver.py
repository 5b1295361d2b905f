"""`aevb-dist train` on the driver: everything a run does before and after its workers, whichever
launcher starts them (`ray_launcher` on a Ray cluster or the embedded Ray, `local_launcher` for
`ray.local_mode=true`). Resume is the same under both: a rerun with the same `run.storage_uri`
and `run.name` continues from the newest complete checkpoint in the run folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from aevb_dist.cluster import compat
from aevb_dist.config import absolute_local_uris, to_dict, to_yaml, unused_keys
from aevb_dist.config.checks import same_image_shape
from aevb_dist.config.schema import Config
from aevb_dist.console import Interrupted, first_line, say
from aevb_dist.data.reader import ParquetDataset
from aevb_dist.data.statistics import mean_intensity
from aevb_dist.model.hierarchical import model_from_config
from aevb_dist.run import checkpoint, storage
from aevb_dist.run.lease import LeaseHeld, RunLease
from aevb_dist.run.metrics import ProgressPrinter, read_metrics
from aevb_dist.run.uri import absolute_tracking_uri
from aevb_dist.tracking.mlflow_run import check_store, open_before_launch
from aevb_dist.train import stop_request
from aevb_dist.train.batches import BatchSource
from aevb_dist.train.datasets import open_datasets, with_covariate_sizes
from aevb_dist.train.local_launcher import launch_local
from aevb_dist.train.ray_launcher import launch_on_ray
from aevb_dist.train.worker import WorkerSpec


def train(cfg: Config, wait_for_lease: bool = True, mlflow_parent_run_id: Optional[str] = None) -> dict:
    """Run (or resume) training; returns the last row of metrics.csv. A run held by a driver on another
    machine whose heartbeat stopped is waited for (`wait_for_lease`) or refused. `mlflow_parent_run_id`: a
    sweep's MLflow run, the parent of this run's."""
    train_data, _ = open_datasets(cfg)  # fail fast, before any worker starts
    if cfg.tracking.mlflow_uri is not None:
        check_store(absolute_tracking_uri(cfg.tracking.mlflow_uri))
    # The training set as found here, handed to every worker: workers open it without reading its index or
    # footers (O(1) storage requests per worker whatever the number of shards).
    train_description = train_data.describe()
    train_data.check_fits_likelihood(cfg.model.likelihood, cfg.data.train_uri)
    cfg = model_for_data(cfg, train_data)
    cfg = absolute_local_uris(cfg)  # workers, Ray tasks and jobs run in other folders
    config_yaml = to_yaml(cfg)  # the run folder's config.yaml
    for line in unused_keys(cfg):
        say(f"warning: {line}")
    if storage.scheme_of(cfg.run.storage_uri) == "memory":
        raise ValueError(
            "run.storage_uri=memory://... is private to one process; workers cannot share it. Use a local path or s3://"
        )
    run = storage.run_folder(cfg.run)
    lease = _claim_run_folder(cfg, config_yaml, run, wait_for_lease)
    try:
        plan = plan_run(cfg, train_data, run.uri, *_newest_checkpoint(run))
        announcement = plan.announcement(cfg.run.name, run.uri)
        if announcement:
            say(announcement)
        if cfg.tracking.mlflow_uri is not None and not plan.done:
            experiment = cfg.tracking.experiment or "Default"
            say(f"tracking in MLflow at {cfg.tracking.mlflow_uri}, experiment {experiment}")
            open_before_launch(cfg.tracking, run, to_dict(cfg), mlflow_parent_run_id)
        signum = None
        if not plan.done:
            spec = WorkerSpec(
                cfg,
                run,
                threads=None,
                train_description=train_description,
                mlflow_parent_run_id=mlflow_parent_run_id,
            )
            signum = _launch(spec, train_data, plan)
    finally:
        lease.release()
    rows = read_metrics(run.fs, run.file("metrics.csv"))
    last = rows[-1] if rows else {}
    if not plan.done and last.get("step", 0) < plan.total_steps:
        say(
            f"stopped at step {last.get('step', 0)} of {plan.total_steps}, with a checkpoint of it in {run.uri}; "
            "run the same command again to resume"
        )
        if signum is not None:  # the command's exit status says the run is unfinished
            raise Interrupted(signum, told=True)
    elif not plan.done:
        say(f"done: {run.uri} (step {last.get('step', 0)}, test ELBO {last.get('test_elbo', float('nan')):.2f})")
    return last


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, decided before any worker starts, from the config, the data and the run folder's
    newest complete checkpoint."""

    total_steps: int  # from the config's length and the run's partitions (a resumed run's recorded ones)
    start_step: int  # 0 for a new run
    resumes_from: Optional[str]  # the checkpoint's name
    computes_data_mean: bool  # model.output_bias_init=data_mean, for a new run

    @property
    def done(self) -> bool:
        return self.start_step >= self.total_steps

    def announcement(self, name: str, uri: str) -> Optional[str]:
        """What the command says before it launches (None for a new run: the launcher's line says it)."""
        if self.resumes_from is None:
            return None
        if self.done:
            return (
                f"{uri} is already at step {self.start_step} of {self.total_steps} ({self.resumes_from}); nothing "
                "to train. Raise train.max_steps or train.num_epochs to continue"
            )
        return f"resuming {name} from {self.resumes_from} (step {self.start_step} of {self.total_steps})"


def plan_run(cfg: Config, train_data, run_uri: str, newest: Optional[str], manifest: Optional[dict]) -> RunPlan:
    """The run's plan; a checkpoint of a different model, or of other partitions, is refused in one line. No
    I/O beyond what `train_data` already holds."""
    # A resumed global-batch run keeps the partitions its checkpoint recorded; its steps are counted over them.
    # (An older manifest does not say: its workers count them.)
    recorded = manifest is not None and "partitioning" in manifest
    saved = manifest["partitioning"] if recorded else None
    source = BatchSource(
        train_data,
        train_cfg=cfg.train,
        data_cfg=cfg.data,
        seed=cfg.seed,
        rank=0,
        world_size=cfg.train.num_workers,
        binarization="none",
        device=None,
        num_partitions=saved["num_partitions"] if saved else None,
    )
    if newest is None:
        return RunPlan(source.total_steps(), 0, None, cfg.model.output_bias_init == "data_mean")
    name = newest.rstrip("/").rsplit("/", 1)[-1]
    checkpoint.check_fits(to_dict(cfg)["model"], manifest.get("model"), run_uri, name)
    if recorded:
        source = source.resumed(saved) or source
    return RunPlan(source.total_steps(), int(manifest["step"]), name, False)


def _newest_checkpoint(run: storage.Folder) -> tuple[Optional[str], Optional[dict]]:
    newest = checkpoint.latest(run.fs, run.path, warn=lambda m: say(f"warning: {m}"))
    return newest, None if newest is None else checkpoint.read_manifest(run.fs, newest)


def _launch(spec: WorkerSpec, train_data, plan: RunPlan) -> Optional[int]:
    """The workers, on Ray or in local mode, with the driver's progress lines and its stop request. Each
    worker is handed `spec`, with the data mean where the model starts from it; its launcher sets its
    threads. Returns the signal that asked the run to stop, if one did."""
    cfg, run = spec.config, spec.run
    launch = launch_local if cfg.ray.local_mode else launch_on_ray
    if plan.computes_data_mean:
        spec = dataclasses.replace(spec, data_mean=_data_mean(train_data))
    stop_request.clear(run)  # one left by an earlier run is not this run's
    # Stopped before this launch logs a step, a run keeps what it had (metrics.csv's first row of a launch is
    # step 1, or a resumed run's next log interval).
    before = f"a rerun resumes from {plan.resumes_from} again" if plan.resumes_from else "with nothing to checkpoint"
    try:
        with (
            ProgressPrinter(run, plan.total_steps, plan.start_step) as progress,
            stop_request.maybe_stop_on_signals(run, progress.trained_past_start_now, before) as signals,
        ):
            launch(spec, train_data.num_rows)
        return signals.signum
    finally:
        try:
            stop_request.clear(run)
        except Exception:  # storage unreachable (the run's own error says so): the next run clears it
            pass


def _data_mean(train_data) -> list[float]:
    """model.output_bias_init=data_mean: the training set's mean pixel, read once here for every worker."""
    say(f"model.output_bias_init=data_mean: the mean pixel of {train_data.num_rows:,} training examples")
    return mean_intensity(train_data).tolist()


def model_for_data(cfg: Config, train_data: ParquetDataset) -> Config:
    """model.input_shape (and model.covariate_sizes) from the training data when unset, refused in one line when
    it differs; then the networks are built once here, so that a factory that does not import, or returns the
    wrong shapes, or a conv network too deep for the images, stops the run before any worker starts."""
    data_shape = train_data.shape
    cfg = dataclasses.replace(cfg, model=with_covariate_sizes(cfg.model, train_data))
    m = cfg.model
    if m.input_shape is None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, input_shape=list(data_shape)))
    elif not same_image_shape(m.input_shape, data_shape):
        raise ValueError(
            f"model.input_shape={list(m.input_shape)} differs from the training data's shape "
            f"{list(data_shape)} ({cfg.data.train_uri})"
        )
    model_from_config(cfg.model)
    return cfg


def _stop_main_thread(reason: str) -> None:
    """The lease was lost (another driver took the run over): stop training, as Ctrl-C would."""
    say(reason)
    compat.interrupt_main_thread()


def _claim_run_folder(cfg: Config, config_yaml: str, run: storage.Folder, wait_for_lease: bool) -> RunLease:
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
        run.fs.pipe_file(run.file("config.yaml"), config_yaml.encode())
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
