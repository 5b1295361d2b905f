"""`aevb-dist sweep`: a Ray Tune search whose every trial is an ordinary training run.

The shape Ray Train V2 and Tune take together: a Tune trial (a function holding no CPU of its own) launches
its run with `train.driver.train`, which starts the Ray Train workers as any run does; the trial reads the
run's metrics.csv as it grows and reports each row that carries the sweep's metric to Tune (ASHA's time is the
training step). Each trial's run folder is `SWEEP/trial_NNNNN`, so `evaluate`, `encode` and `plot` work on it.

Nothing lost:
- Tune's own state lives in `SWEEP/tune`. The same command after a killed driver restores it: finished trials
  are kept, running ones start again and resume from their run folder's newest checkpoint, pending ones start.
- Ctrl-C (or SIGTERM) writes a stop request into every trial's run folder: each running trial checkpoints its
  next step and stops, trials not begun stop before training, and the sweep ends unfinished (exit 130/143);
  the same command resumes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
from dataclasses import dataclass
from typing import Optional

from aevb_dist.config import absolute_local_uris, config_with
from aevb_dist.config.schema import Config
from aevb_dist.console import Interrupted, say
from aevb_dist.run import storage
from aevb_dist.run.metrics import MetricsTail
from aevb_dist.run.uri import join
from aevb_dist.sweep.space import Space, trial_overrides
from aevb_dist.sweep.table import TrialTable
from aevb_dist.sweep.trials import TRIAL_PREFIX, trial_name
from aevb_dist.train import stop_request

TUNE_FOLDER = "tune"  # Ray Tune's experiment state, inside the sweep's folder
STOP_FILE = "stop_request"  # in the sweep folder: trials that have not begun stop before training
POLL_S = 1.0  # how often a trial reads its run's new metrics rows
# The CPU a trial's own actor holds: it only waits on its run (Tune refuses a trial of no resources at all).
TRIAL_CPU = 0.01


@dataclass(frozen=True)
class SweepOptions:
    name: str
    num_samples: int = 1
    max_concurrent: Optional[int] = None
    scheduler: str = "fifo"  # fifo | asha
    metric: str = "test_elbo"  # test_elbo | train_elbo, maximized


@dataclass(frozen=True)
class TrialSetup:
    """What every trial is handed (pickled to the trial's actor)."""

    base: Config  # the sweep's config, paths absolute
    space: Space
    folder_uri: str  # the sweep's folder: trials' runs go inside
    endpoint_url: Optional[str]
    metric: str
    mlflow_parent_run_id: Optional[str] = None


class SweepStopped(RuntimeError):
    """A trial stopped by the sweep's Ctrl-C, with its checkpoint: restarted (and resumed) by a rerun."""


def run_trial(values: dict, setup: TrialSetup) -> None:
    """One trial: the run the sweep's values make, trained (or resumed) to its end, with each row carrying the
    metric reported to Tune."""
    from ray import tune

    from aevb_dist.train.driver import train

    folder = storage.Folder.open(setup.folder_uri, setup.endpoint_url)
    if folder.fs.exists(folder.file(STOP_FILE)):
        raise SweepStopped("the sweep was asked to stop before this trial began")
    name = tune.get_context().get_trial_name()  # trial_name, as the Tuner was told
    cfg = config_with(
        setup.base,
        trial_overrides(setup.space, values) + [f"run.storage_uri={setup.folder_uri}", f"run.name={name}"],
    )
    run = storage.run_folder(cfg.run)
    tail = MetricsTail(run.fs, run.file("metrics.csv"))
    outcome: dict = {}

    def training() -> None:
        try:
            outcome["last"] = train(cfg, mlflow_parent_run_id=setup.mlflow_parent_run_id)
        except BaseException as err:  # noqa: BLE001 - raised again in the trial's thread
            outcome["error"] = err

    runner = threading.Thread(target=training, name="aevb-trial", daemon=True)
    runner.start()
    while runner.is_alive():
        runner.join(POLL_S)
        _report(tune, tail, setup.metric)
    _report(tune, tail, setup.metric)
    if "error" in outcome:
        raise outcome["error"]
    if folder.fs.exists(folder.file(STOP_FILE)):  # not finished: a rerun restarts the trial, which resumes
        raise SweepStopped(f"{name} stopped by the sweep's stop request, with a checkpoint")


def _report(tune, tail: MetricsTail, metric: str) -> None:
    for row in tail.new_rows():
        value = row.get(metric)
        if value is None or value != value:  # NaN: a row without the metric (test ELBO between evaluations)
            continue
        report = {key: row[key] for key in ("step", "epoch", "train_elbo", "test_elbo") if row[key] == row[key]}
        tune.report(report)


def run_sweep(base: Config, space: Space, options: SweepOptions, mlflow_parent_run_id: Optional[str] = None) -> dict:
    """The sweep to its end (or resumed); returns {"folder": Folder, "grid": ResultGrid}."""
    from ray import tune

    from aevb_dist.cluster.ray_runtime import cluster_cpus, start_ray, stop_ray

    base = absolute_local_uris(base)
    folder = storage.Folder.open(join(base.run.storage_uri, options.name), base.run.s3_endpoint_url)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own reporter stays quiet (verbose=0): ours prints
    started = start_ray(base.ray.address, base.ray.show_worker_logs, state_api=True)
    try:
        concurrent = options.max_concurrent or _trials_that_fit(base, cluster_cpus())
        base = _sized_for(base, concurrent, cluster_cpus())
        setup = TrialSetup(base, space, folder.uri, base.run.s3_endpoint_url, options.metric, mlflow_parent_run_id)
        with contextlib.suppress(FileNotFoundError):  # an earlier Ctrl-C's
            folder.fs.rm(folder.file(STOP_FILE))
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": TRIAL_CPU})
        tuner = _tuner(tune, trainable, base, space, options, folder, concurrent)
        grid, signum = _fit_with_stop(tuner, folder)
    finally:
        stop_ray(started)
    if signum is not None:
        say(f"stopped: every running trial kept a checkpoint in {folder.uri}; run the same command to resume")
        raise Interrupted(signum, told=True)
    return {"folder": folder, "grid": grid}


def _trials_that_fit(cfg: Config, cpus: float) -> int:
    """Trials at once where the user does not say: as many as the CPUs hold at the workers' CPUs each."""
    per_trial = cfg.train.num_workers * (cfg.train.cpus_per_worker or 1.0)
    return max(1, int(cpus // per_trial))


def _sized_for(cfg: Config, concurrent: int, cpus: float) -> Config:
    """train.cpus_per_worker, where unset, as the embedded Ray's CPUs shared by the trials that run at once (a
    run alone takes them all, and the next trial would wait for it)."""
    if cfg.train.cpus_per_worker is not None or cfg.ray.address or cfg.ray.local_mode:
        return cfg
    # 10% left over: with the CPUs reserved to the last hundredth, Ray Train's second round of trials waited for
    # its workers forever (measured on the embedded Ray, 2 CPUs, 2 trials at once)
    share = max(0.9 * (cpus - concurrent * TRIAL_CPU) / (concurrent * cfg.train.num_workers), 0.01)
    share = math.floor(share * 100) / 100
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cpus_per_worker=share))


def _tuner(tune, trainable, base: Config, space: Space, options: SweepOptions, folder, concurrent: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    parent, storage_fs = storage.ray_train_storage(folder)  # (the sweep folder's parent, its filesystem)
    storage_path = f"{parent.rstrip('/')}/{options.name}"
    tune_path = f"{storage_path}/{TUNE_FOLDER}"
    if tune.Tuner.can_restore(tune_path, storage_filesystem=storage_fs):
        say(f"resuming the sweep {options.name} from {folder.uri}")
        return tune.Tuner.restore(
            tune_path, trainable, resume_unfinished=True, restart_errored=True, storage_filesystem=storage_fs
        )
    if options.scheduler == "asha":
        total = _total_steps(base)
        scheduler = ASHAScheduler(time_attr="step", max_t=total, grace_period=max(1, total // 8), reduction_factor=2)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=_param_space(tune, space),
        tune_config=tune.TuneConfig(
            metric=options.metric,
            mode="max",
            num_samples=options.num_samples,
            max_concurrent_trials=concurrent,
            scheduler=scheduler,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=TUNE_FOLDER,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            verbose=0,
            callbacks=[TrialTable(space, options.metric)],
            failure_config=tune.FailureConfig(max_failures=0),  # a run retries itself (train.max_failures)
        ),
    )


def _param_space(tune, space: Space) -> dict:
    samplers = {
        "grid": lambda v: tune.grid_search(list(v)),
        "choice": lambda v: tune.choice(list(v)),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
        "fixed": lambda v: v[0],
    }
    return {d.key: samplers[d.sampler](d.values) for d in space.dimensions}


def _total_steps(cfg: Config) -> int:
    """The run's length in steps, as the driver plans it, for ASHA's last rung."""
    from aevb_dist.train.datasets import open_datasets
    from aevb_dist.train.driver import plan_run

    train_data, _ = open_datasets(cfg)
    return plan_run(cfg, train_data, "", None, None).total_steps


def _fit_with_stop(tuner, folder) -> tuple:
    """tuner.fit() off the main thread; the main thread takes SIGINT/SIGTERM and asks every trial to stop with
    a checkpoint (a second signal stops at once)."""
    outcome: dict = {}
    seen: list[int] = []

    def fit() -> None:
        try:
            outcome["grid"] = tuner.fit()
        except BaseException as err:  # noqa: BLE001 - raised again on the main thread
            outcome["error"] = err

    def on_signal(signum, frame) -> None:
        if seen:
            raise Interrupted(signum)
        seen.append(signum)
        say(f"{signal.Signals(signum).name}: every trial checkpoints its next step and stops (again: stop at once)")
        threading.Thread(target=_ask_trials_to_stop, args=(folder,), daemon=True).start()

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        runner = threading.Thread(target=fit, name="aevb-tune-fit", daemon=True)
        runner.start()
        while runner.is_alive():
            runner.join(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["grid"], (seen[0] if seen else None)


def _ask_trials_to_stop(folder) -> None:
    folder.fs.pipe_file(folder.file(STOP_FILE), b"stop\n")
    for path in folder.fs.ls(folder.path, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(TRIAL_PREFIX):
            stop_request.request(storage.Folder(join(folder.uri, name), folder.fs, path), "the sweep was stopped")
