"""`aevb-dist sweep CONFIG --space SPACE.yaml`: everything a sweep does before and after Ray Tune runs its trials.

Before: the space read and every value checked by the schema; the sweep folder claimed for this space (a
rerun with another space under the same name is refused); the sweep's MLflow parent run where tracking is on.
After: trials.csv, best.yaml and the plot (sweep/results.py), the table, and the best trial named.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from aevb_dist.config import absolute_local_uris
from aevb_dist.config.schema import Config
from aevb_dist.console import say
from aevb_dist.run import storage
from aevb_dist.run.uri import join
from aevb_dist.sweep.results import best_trial, trial_rows, write_results
from aevb_dist.sweep.space import check_space, read_space
from aevb_dist.sweep.tuning import SweepOptions, run_sweep

SWEEP_FILE = "sweep.json"  # the space and options the sweep folder was started with


def sweep(cfg: Config, space_path: str, options: SweepOptions) -> dict:
    """Run (or resume) the sweep; returns {"rows": [TrialRow], "best": TrialRow | None, "files": {...}}."""
    space = read_space(space_path)
    check_space(cfg, space, space_path)
    _check_options(cfg, options)
    cfg = absolute_local_uris(cfg)
    folder = storage.Folder.open(join(cfg.run.storage_uri, options.name), cfg.run.s3_endpoint_url)
    _claim(folder, space_path, options)
    parent = _mlflow_parent(cfg, folder, options, space_path)
    parent_id = parent.wait_for_run_id(30.0) if parent is not None else None
    say(
        f"sweep {options.name}: {options.num_samples} sample(s) of {space_path} "
        f"({', '.join(space.keys)}), {options.scheduler} scheduler, {options.metric} maximized → {folder.uri}"
    )
    try:
        outcome = run_sweep(cfg, space, options, mlflow_parent_run_id=parent_id)
    except BaseException:
        if parent is not None:
            parent.finish(None)  # the sweep goes on in a rerun: its MLflow run stays RUNNING
        raise
    rows = trial_rows(folder, outcome["grid"], space, options.metric)
    files = write_results(folder, rows, space, options.metric, options.name)
    if parent is not None:
        _end_trials_killed_by_tune(cfg.tracking.mlflow_uri, folder, rows)
        parent.finish("FINISHED")
    best = best_trial(rows)
    counts = {state: sum(r.state == state for r in rows) for state in ("done", "stopped_early", "error")}
    say(
        f"sweep {options.name}: {len(rows)} trial(s): {counts['done']} done, {counts['stopped_early']} stopped early"
        f" by ASHA, {counts['error']} failed; {files['trials']}"
    )
    if best is not None:
        say(f"best: {best.trial}, {options.metric} {best.metric:.2f} ({best.run_uri}); its config: {files['best']}")
    return {"rows": rows, "best": best, "files": files}


def _end_trials_killed_by_tune(tracking_uri: str, folder: storage.Folder, rows: list) -> None:
    """ASHA kills the trials it stops (even one at its last step, as it ends): their MLflow runs still RUNNING end
    here, as their own workers could not: FINISHED where the run reached its planned steps, else KILLED."""
    from aevb_dist.tracking.mlflow_run import end_abandoned_run

    for row in rows:
        if row.state in ("done", "stopped_early"):
            run = storage.Folder(row.run_uri, folder.fs, folder.file(row.trial))
            end_abandoned_run(tracking_uri, run, "FINISHED" if row.state == "done" else "KILLED")


def _check_options(cfg: Config, options: SweepOptions) -> None:
    if options.num_samples < 1:
        raise ValueError(f"--num-samples={options.num_samples} must be at least 1")
    if options.max_concurrent is not None and options.max_concurrent < 1:
        raise ValueError(f"--max-concurrent={options.max_concurrent} must be at least 1")
    if not options.name or "/" in options.name:
        raise ValueError(f"--name={options.name!r} must be a non-empty name without '/'")
    if options.metric == "test_elbo" and not cfg.data.test_uri:
        raise ValueError("--metric=test_elbo needs data.test_uri; set it, or sweep on --metric=train_elbo")
    if options.scheduler == "asha" and options.metric == "test_elbo" and cfg.train.eval_every_steps == 0:
        raise ValueError(
            "--scheduler=asha compares trials by the test ELBO as they train, and train.eval_every_steps=0 "
            "evaluates only at the end: set train.eval_every_steps"
        )


def _claim(folder: storage.Folder, space_path: str, options: SweepOptions) -> None:
    """The sweep folder records its space and options; a rerun with others under the same name is refused."""
    with open(space_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    record = {
        "space_sha256": digest,
        "num_samples": options.num_samples,
        "scheduler": options.scheduler,
        "metric": options.metric,
    }
    path = folder.file(SWEEP_FILE)
    if folder.fs.exists(path):
        kept = json.loads(folder.fs.cat_file(path).decode())
        changed = [k for k in record if kept.get(k) != record[k]]
        if changed:
            raise ValueError(
                f"the sweep {options.name} in {folder.uri} was started with another "
                f"{', '.join('search space' if k == 'space_sha256' else k for k in changed)}; "
                "rerun it as it was to resume it, or give this one another --name"
            )
        return
    folder.fs.makedirs(folder.path, exist_ok=True)
    folder.fs.pipe_file(path, json.dumps(record).encode())


def _mlflow_parent(cfg: Config, folder: storage.Folder, options: SweepOptions, space_path: str) -> Optional[object]:
    """The sweep's MLflow run, parent of each trial's, where tracking.mlflow_uri is set."""
    t = cfg.tracking
    if t.mlflow_uri is None:
        return None
    from aevb_dist.tracking.mlflow_run import MlflowRun, TrackedRun, check_store

    check_store(t.mlflow_uri)
    with open(space_path) as f:
        space_text = f.read()
    params = {"space": space_text[:6000], "num_samples": str(options.num_samples), "scheduler": options.scheduler}
    tracked = TrackedRun(t.mlflow_uri, t.experiment, folder, options.name, params | {"metric": options.metric})
    return MlflowRun(tracked, artifacts=("trials.csv", "best.yaml", f"{options.metric}_by_value.png"))
