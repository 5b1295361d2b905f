"""The per-worker function and the driver that launches it on Ray (with local_launcher, for Ray
Train's local mode, the only modules that import ray.train).

Resume is Ray Train's: a new TorchTrainer with the same storage path and run name. The
worker picks the newest checkpoint in the run folder whose manifest verifies, so an
upload cut off part way is skipped in favour of the last good one (in either mode).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
from typing import Optional

import torch

from aevb_dist import checkpoint, storage
from aevb_dist.config import Config, config_from_dict, to_dict, to_yaml
from aevb_dist.ray_runtime import USER_ERRORS, cluster_cpus, say, start_ray, stop_ray
from aevb_dist.run_log import MetricsTail, RunLog, progress_line, read_metrics
from aevb_dist.training import Trainer, open_datasets, total_steps


def run_uri(cfg: Config) -> str:
    return storage.join(cfg.run.storage_uri, cfg.run.name)


# -- worker side ------------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    cfg = config_from_dict(loop_config["config"])
    local_mode = loop_config.get("local_mode", False)
    torch.set_num_threads(loop_config["threads_per_worker"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.train.use_gpu:
        device = "cpu"
    else:  # in local mode Ray assigns no GPUs: Ray Train's local controller pins cuda:LOCAL_RANK
        device = f"cuda:{ctx.get_local_rank()}" if local_mode else str(ray.train.torch.get_device())
    trainer = Trainer(cfg, rank=rank, world_size=world_size, device=device)

    fs, run_path = storage.resolve(run_uri(cfg), cfg.run.s3_endpoint_url)
    latest = checkpoint.latest(fs, run_path)
    if latest is not None:
        note = trainer.load_state_dict(checkpoint.load(fs, latest, map_location=device))
        if note and rank == 0:
            say(f"warning: {note}")
    log = RunLog(run_uri(cfg), resume_step=trainer.state.step, total_steps=trainer.total_steps,
                 endpoint_url=cfg.run.s3_endpoint_url) if rank == 0 else None

    def on_log(row: dict) -> None:
        if log is not None:
            log.append(row)

    def on_checkpoint(state: dict, row: dict) -> None:
        step = state["state"]["step"]
        metrics = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))} or {"step": step}
        name = checkpoint.checkpoint_name(step)
        if rank != 0:
            if not local_mode:  # every rank reports at the same steps: report is a barrier
                ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="aevb-ckpt-") as folder:
            checkpoint.save(folder, state, to_dict(cfg))
            if local_mode:  # Ray Train's local mode keeps reported checkpoints in memory only
                checkpoint.upload(folder, fs, f"{run_path}/{name}")
                checkpoint.prune(fs, run_path, cfg.checkpoint.keep_last)
            else:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=name)
        log.flush()

    trainer.fit(on_log, on_checkpoint)
    if log is not None:
        log.close()


# -- driver side ------------------------------------------------------------------------------
def _storage_for_ray(cfg: Config) -> tuple[str, Optional[object]]:
    """(storage_path, storage_filesystem) for RunConfig; remote filesystems are wrapped for pyarrow."""
    scheme = storage.scheme_of(cfg.run.storage_uri)
    if scheme == "memory":
        raise ValueError("run.storage_uri=memory://... is private to one process; workers cannot share it. "
                         "Use a local path or s3://")
    fs, path = storage.resolve(cfg.run.storage_uri, cfg.run.s3_endpoint_url)
    if scheme == "file":
        return path, None
    return path, storage.pyarrow_filesystem(fs)


def _prepare_run_folder(cfg: Config) -> None:
    uri = run_uri(cfg)
    try:
        fs, path = storage.resolve(uri, cfg.run.s3_endpoint_url)
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(f"{path}/config.yaml", to_yaml(cfg).encode())
    except (OSError, PermissionError) as err:
        raise ValueError(f"cannot write to run.storage_uri {cfg.run.storage_uri}: {_first_line(err)}") from None
    except Exception as err:  # botocore's endpoint and credential errors have no common base we import
        raise ValueError(f"cannot reach run.storage_uri {cfg.run.storage_uri}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


class ProgressPrinter:
    """Prints new metrics.csv rows while the run goes; the workers' own logs stay in Ray's log files."""

    def __init__(self, cfg: Config, total_steps: int, start_step: int, interval_s: float = 1.0):
        fs, path = storage.resolve(run_uri(cfg), cfg.run.s3_endpoint_url)
        self.tail, self.total_steps, self.interval_s = MetricsTail(fs, f"{path}/metrics.csv"), total_steps, interval_s
        self._rows()  # what is there already (rows past `start_step` are trained again, and printed then)
        self.last_step = start_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _rows(self) -> list[dict]:
        try:
            return self.tail.new_rows()
        except Exception:  # a half-written file or a transient storage error: try again next tick
            return []

    def poll(self) -> None:
        for row in self._rows():
            if row["step"] > self.last_step:
                print(progress_line(row, self.total_steps), file=sys.stderr, flush=True)
                self.last_step = row["step"]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()


def _cpus_per_worker(cfg: Config) -> float:
    if cfg.train.cpus_per_worker is not None:
        return cfg.train.cpus_per_worker
    # Our reader runs inside each worker (no Ray Data tasks), so workers may share all CPUs.
    total = cluster_cpus()
    return max(total / cfg.train.num_workers if not cfg.ray.address else 1.0, 0.01)


def _user_error(err: Exception) -> Exception:
    """The root cause of a failed run, as a one-line ValueError where it is the user's to fix."""
    failures = getattr(err, "worker_failures", None) or {}
    causes = list(failures.values()) or [getattr(err, "controller_failure", err)]
    for cause in causes:
        seen = cause
        while seen is not None:
            if isinstance(seen, USER_ERRORS):
                return ValueError(str(seen).splitlines()[0])
            seen = getattr(seen, "cause", None) or seen.__cause__
    return err


def _announce_resume(cfg: Config, steps: int) -> int:
    """The step the run resumes from (0 for a new run), said aloud."""
    fs, path = storage.resolve(run_uri(cfg), cfg.run.s3_endpoint_url)
    latest = checkpoint.latest(fs, path, warn=lambda m: say(f"warning: {m}"))
    if latest is None:
        return 0
    manifest = checkpoint.read_manifest(fs, latest)
    step, name = int(manifest["step"]), latest.rsplit("/", 1)[-1]
    _check_same_model(cfg, manifest.get("model"), name)
    if step >= steps:
        say(f"{run_uri(cfg)} is already at step {step} of {steps} ({name}); nothing to train. "
             "Raise train.max_steps or train.num_epochs to continue")
    else:
        say(f"resuming {cfg.run.name} from {name} (step {step} of {steps})")
    return step


def _check_same_model(cfg: Config, saved_model: Optional[dict], name: str) -> None:
    if not saved_model:
        return
    current = to_dict(cfg)["model"]
    changed = [f"model.{k}: {saved_model[k]} in {name}, {current[k]} now"
               for k in current if k in saved_model and saved_model[k] != current[k] and k != "init_std"]
    if changed:
        raise ValueError(f"{run_uri(cfg)} holds a checkpoint of a different model ({'; '.join(changed)}); "
                         "use another run.name, or the model settings it was trained with")


def absolute_local_uris(cfg: Config) -> Config:
    """Workers run in other folders: local paths are made absolute on the driver."""
    cfg = config_from_dict(to_dict(cfg))
    for section, key in (("data", "train_uri"), ("data", "test_uri"), ("run", "storage_uri")):
        value = getattr(getattr(cfg, section), key)
        if value and storage.scheme_of(value) == "file":
            setattr(getattr(cfg, section), key, storage.resolve(value)[1])
    return cfg


def train(cfg: Config) -> dict:
    """Run (or resume) training; returns the last row of metrics.csv."""
    cfg = absolute_local_uris(cfg)
    train_data, _ = open_datasets(cfg)  # fail fast, before any worker starts
    storage_path, storage_fs = _storage_for_ray(cfg)
    _prepare_run_folder(cfg)
    steps = total_steps(train_data, cfg, cfg.train.num_workers)
    start_step = _announce_resume(cfg, steps)
    if start_step >= steps:
        return _last_metrics(cfg)
    progress = ProgressPrinter(cfg, steps, start_step)
    if cfg.ray.local_mode:
        _train_local_mode(cfg, progress, train_data.num_rows)
    else:
        _train_on_ray(cfg, progress, train_data.num_rows, storage_path, storage_fs)
    last = _last_metrics(cfg)
    say(f"done: {run_uri(cfg)} (step {last.get('step', 0)}, test ELBO {last.get('test_elbo', float('nan')):.2f})")
    return last


def _train_local_mode(cfg: Config, progress: ProgressPrinter, num_rows: int) -> None:
    from aevb_dist import local_launcher

    n = cfg.train.num_workers
    if cfg.train.use_gpu and torch.cuda.device_count() < n:
        raise ValueError(f"ray.local_mode=true with train.use_gpu=true needs a GPU per worker: "
                         f"train.num_workers={n}, GPUs visible: {torch.cuda.device_count()}")
    _forget_ray_checkpoint_list(cfg)
    threads = (math.floor(cfg.train.cpus_per_worker + 1e-6) if cfg.train.cpus_per_worker is not None
               else (os.cpu_count() or 1) // n)
    threads = max(1, threads)
    say(f"training {cfg.run.name} in Ray Train's local mode: {n} worker process(es), {threads} thread(s) "
        f"each, {num_rows:,} training examples → {run_uri(cfg)}")
    with progress:
        local_launcher.run({"config": to_dict(cfg), "threads_per_worker": threads, "local_mode": True},
                           num_workers=n, max_failures=cfg.train.max_failures)


def _forget_ray_checkpoint_list(cfg: Config) -> None:
    """Local mode prunes checkpoints that an earlier run on Ray may have listed in its snapshot file;
    Ray Train refuses to resume a run whose snapshot names a missing checkpoint. We never resume
    through Ray's list (the worker picks the newest verified folder), so the list is dropped instead.
    A later run on Ray then keeps `checkpoint.keep_last` of its own checkpoints and leaves older ones."""
    fs, path = storage.resolve(run_uri(cfg), cfg.run.s3_endpoint_url)
    snapshot = f"{path}/checkpoint_manager_snapshot.json"  # ray.train.v2: CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    if fs.exists(snapshot):
        fs.rm(snapshot)


def _train_on_ray(cfg: Config, progress: ProgressPrinter, num_rows: int, storage_path: str, storage_fs) -> None:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = start_ray(cfg.ray.address, cfg.ray.show_worker_logs)
    try:
        cpus = _cpus_per_worker(cfg)
        threads = max(1, math.floor(cpus + 1e-6))
        say(f"training {cfg.run.name}: {cfg.train.num_workers} worker(s) × {cpus:g} CPU, "
            f"{threads} thread(s) each, {num_rows:,} training examples → {run_uri(cfg)}")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": to_dict(cfg), "threads_per_worker": threads},
            torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo", timeout_s=300),
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                         resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last)),
        )
        try:
            with progress:
                trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise _user_error(err) from None
    finally:
        stop_ray(started)


def _last_metrics(cfg: Config) -> dict:
    fs, path = storage.resolve(run_uri(cfg), cfg.run.s3_endpoint_url)
    rows = read_metrics(fs, f"{path}/metrics.csv")
    return rows[-1] if rows else {}
