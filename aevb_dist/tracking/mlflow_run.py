"""A run's MLflow record (`tracking.mlflow_uri`), written by rank 0 alone, from a background thread.

Training never waits on the tracking store: rows are queued and sent by a thread, and a store that does not
answer is said once, its rows kept (they are in metrics.csv anyway) and sent when it answers again.

What goes to MLflow:
- params: the config's leaves, flattened (`model.latent_dim`), once, when the MLflow run is created;
- metrics: every metrics.csv row, at its training step;
- at the end: metrics.csv, config.yaml and the learning curve as artifacts, the final checkpoint's URI as the
  `checkpoint_uri` tag, and the run's status (FINISHED; KILLED when stopped by a request; FAILED on an error).

The MLflow run's id is kept in the run folder (`mlflow_run.json`), so a resumed run, or a worker group that Ray
Train restarted, continues the same MLflow run. A sweep's trial is a child of the sweep's run
(`mlflow.parentRunId`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from aevb_dist.console import first_line, say
from aevb_dist.run import storage

RUN_ID_FILE = "mlflow_run.json"
# metrics.csv's columns sent as MLflow metrics (step and time are the metric's own step and timestamp)
METRIC_COLUMNS = (
    "train_elbo",
    "test_elbo",
    "train_objective",
    "samples_per_s",
    "learning_rate",
    "num_workers",
    "epoch",
    "samples_seen",
    "skipped_steps",
)
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
RETRY_S = 5.0  # between two tries while the store does not answer
DRAIN_S = 30.0  # how long the end of a run waits for unsent rows and the artifacts
# An MLflow HTTP call retries for minutes by default; the sender thread retries itself, so it asks MLflow to
# give up sooner (the user's own settings win).
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def require_mlflow() -> Any:
    try:
        import mlflow  # noqa: F401
        from mlflow import MlflowClient
    except ImportError:
        raise ValueError(
            "tracking.mlflow_uri needs MLflow, which is not installed: pip install 'aevb-dist[tracking]'"
        ) from None
    return MlflowClient


def check_store(tracking_uri: str) -> None:
    """The driver's check before any worker starts: MLflow is installed and takes the URI (a folder store that
    MLflow refuses, a database URI it cannot open); one line otherwise. A server is not asked here: one that
    does not answer never stops training."""
    require_mlflow()
    try:
        client_for(tracking_uri)
    except Exception as err:  # MlflowException, SQLAlchemy's errors
        raise ValueError(f"tracking.mlflow_uri={tracking_uri}: MLflow refuses it: {first_line(err)}") from None


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The config's leaves as MLflow params: dotted keys, values as YAML would show them (None: null)."""
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            text = "null" if value is None else json.dumps(value) if isinstance(value, (list, bool)) else str(value)
            params[f"{prefix}{key}"] = text[:MAX_PARAM_CHARS]
    return params


@dataclass(frozen=True)
class TrackedRun:
    """Which MLflow run a run folder is: the store and experiment, the run folder, its MLflow name and params, and
    its parent (a sweep's run)."""

    tracking_uri: str
    experiment: Optional[str]
    run: storage.Folder
    run_name: str
    params: dict[str, str]
    parent_run_id: Optional[str] = None


class MlflowRun:
    """Rank 0's sender. `log_row` queues a metrics row; `finish` ends the MLflow run, waiting up to
    `drain_s` for what is queued."""

    def __init__(
        self,
        tracked: TrackedRun,
        *,
        artifacts: tuple[str, ...] = ("metrics.csv", "config.yaml"),
        retry_s: float = RETRY_S,
        drain_s: float = DRAIN_S,
    ):
        self.tracked, self.artifacts = tracked, artifacts
        self.tracking_uri, self.run = tracked.tracking_uri, tracked.run
        self.retry_s, self.drain_s = retry_s, drain_s
        self.run_id: Optional[str] = None
        self._client = None
        self._queue: list[dict] = []
        self._ending: Optional[Callable[[], None]] = None  # the last thing the thread sends
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ended = threading.Event()
        self._has_run = threading.Event()
        self._down_since: Optional[float] = None
        self._thread = threading.Thread(target=self._loop, name="aevb-mlflow", daemon=True)
        self._thread.start()

    # -- the training thread's side --------------------------------------------------------------------------
    def log_row(self, row: dict) -> None:
        with self._lock:
            self._queue.append(row)
        self._wake.set()

    def finish(self, status: Optional[str], checkpoint_uri: Optional[str] = None) -> None:
        """Send what is queued, then the artifacts, the checkpoint's tag and `status`; waits up to `drain_s`."""
        with self._lock:
            self._ending = lambda: self._send_end(status, checkpoint_uri)
        self._wake.set()
        self._ended.wait(self.drain_s)
        if not self._ended.is_set():
            with self._lock:
                unsent = len(self._queue)
            say(
                f"warning: MLflow at {self.tracking_uri} did not take the run's end within {self.drain_s:g} s "
                f"({unsent} row(s) unsent); metrics.csv in {self.run.uri} has every row"
            )

    # -- the sender thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._wake.clear()  # before sending: a row queued while sending wakes the next round
            try:
                self._send_queued()
                self._answered()  # before the end too: a run can end while the store is coming back
                with self._lock:
                    ending = self._ending
                if ending is not None:
                    ending()
                    self._ended.set()
                    return
            except Exception as err:  # noqa: BLE001 - the store's errors are many (HTTP, SQLAlchemy, MLflow)
                self._not_answering(err)
                time.sleep(self.retry_s)  # not woken by new rows: an outage costs one try per retry_s
                continue
            self._wake.wait()

    def _not_answering(self, err: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            say(
                f"warning: MLflow at {self.tracking_uri} does not answer ({type(err).__name__}: {first_line(err)}); "
                f"training goes on, every row is in metrics.csv and is sent to MLflow when it answers"
            )

    def _answered(self) -> None:
        if self._down_since is not None:
            say(f"MLflow at {self.tracking_uri} answers again; the rows logged meanwhile are sent")
            self._down_since = None

    def _ensure_run(self):
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        if self.run_id is None:
            self.run_id = open_run(self._client, self.tracked)
            self._has_run.set()
        return self._client

    def wait_for_run_id(self, timeout_s: float) -> Optional[str]:
        """The MLflow run's id once the store answered (None if it did not within `timeout_s`)."""
        self._has_run.wait(timeout_s)
        return self.run_id

    def _send_queued(self) -> None:
        from mlflow.entities import Metric

        client = self._ensure_run()
        while True:
            with self._lock:
                rows = self._queue[: MAX_METRICS_PER_BATCH // len(METRIC_COLUMNS)]
            if not rows:
                return
            metrics = [
                Metric(key, float(row[key]), int(row.get("time", time.time()) * 1000), int(row["step"]))
                for row in rows
                for key in METRIC_COLUMNS
                if isinstance(row.get(key), (int, float)) and not math.isnan(row[key])
            ]
            client.log_batch(self.run_id, metrics=metrics)
            with self._lock:
                del self._queue[: len(rows)]

    def _send_end(self, status: str, checkpoint_uri: Optional[str]) -> None:
        client = self._client
        if checkpoint_uri is not None:
            client.set_tag(self.run_id, "checkpoint_uri", checkpoint_uri)
        with tempfile.TemporaryDirectory(prefix="aevb-mlflow-") as folder:
            for name in self.artifacts:
                if self.run.fs.exists(self.run.file(name)):
                    local = os.path.join(folder, name)
                    self.run.fs.get_file(self.run.file(name), local)
                    client.log_artifact(self.run_id, local)
            curve = _learning_curve_png(self.run, folder)
            if curve is not None:
                client.log_artifact(self.run_id, curve)
        if status is not None:  # None: the run goes on later (a preempted group, an interrupted sweep)
            client.set_terminated(self.run_id, status=status)


def _learning_curve_png(run: storage.Folder, folder: str) -> Optional[str]:
    from aevb_dist.eval.plotting import learning_curve
    from aevb_dist.run.metrics import read_metrics

    rows = read_metrics(run.fs, run.file("metrics.csv"))
    if not rows:
        return None
    path = os.path.join(folder, "learning_curve.png")
    figure = learning_curve(rows, run.uri.rstrip("/").rsplit("/", 1)[-1])
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def end_abandoned_run(tracking_uri: str, run: storage.Folder, status: str) -> None:
    """A run killed from outside (a sweep's trial stopped by ASHA) never ended its MLflow run: end it as `status`
    where it is still RUNNING. Best effort: a store that does not answer leaves it RUNNING."""
    path = run.file(RUN_ID_FILE)
    try:
        if not run.fs.exists(path):
            return
        kept = json.loads(run.fs.cat_file(path).decode())
        client = require_mlflow()(tracking_uri=tracking_uri)
        if kept.get("tracking_uri") == tracking_uri and client.get_run(kept["run_id"]).info.status == "RUNNING":
            client.set_terminated(kept["run_id"], status=status)
    except Exception as err:  # noqa: BLE001 - the store's errors are many; the run's metrics.csv is whole anyway
        say(f"warning: could not end MLflow run of {run.uri}: {type(err).__name__}: {first_line(err)}")


def client_for(tracking_uri: str):
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    return require_mlflow()(tracking_uri=tracking_uri)


def open_run(client, tracked: TrackedRun) -> str:
    """The id of the run folder's MLflow run: the one its `mlflow_run.json` names in this store (set RUNNING
    again), or a new one with its params (recorded in the run folder once it has them)."""
    return _resumed_run_id(client, tracked.tracking_uri, tracked.run) or _new_run_id(client, tracked)


def _resumed_run_id(client, tracking_uri: str, run: storage.Folder) -> Optional[str]:
    path = run.file(RUN_ID_FILE)
    if not run.fs.exists(path):
        return None
    kept = json.loads(run.fs.cat_file(path).decode())
    if kept.get("tracking_uri") != tracking_uri:
        say(
            f"warning: {run.uri} was tracked in MLflow at {kept.get('tracking_uri')}; "
            f"this run starts a new MLflow run at {tracking_uri}"
        )
        return None
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(kept["run_id"])
    except MlflowException:
        say(f"warning: MLflow run {kept['run_id']} is gone from {tracking_uri}; a new MLflow run is started")
        return None
    client.update_run(kept["run_id"], status="RUNNING")
    return kept["run_id"]


def _new_run_id(client, tracked: TrackedRun) -> str:
    from mlflow.entities import Param

    run = tracked.run
    experiment_id = _experiment_id(client, tracked.experiment, tracked.tracking_uri)
    tags = {"mlflow.parentRunId": tracked.parent_run_id} if tracked.parent_run_id else {}
    tags["aevb_dist.run_uri"] = run.uri
    run_id = client.create_run(experiment_id, run_name=tracked.run_name, tags=tags).info.run_id
    listed = [Param(k, v) for k, v in tracked.params.items()]
    for start in range(0, len(listed), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=listed[start : start + MAX_PARAMS_PER_BATCH])
    # kept last: a run folder names an MLflow run only once that run has its params
    record = {"tracking_uri": tracked.tracking_uri, "run_id": run_id, "experiment_id": experiment_id}
    run.fs.makedirs(run.path, exist_ok=True)
    run.fs.pipe_file(run.file(RUN_ID_FILE), json.dumps(record).encode())
    return run_id


def _experiment_id(client, experiment: Optional[str], tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    if experiment is None:
        return "0"  # MLflow's Default experiment
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=_artifact_location(tracking_uri, experiment))
    except MlflowException:  # another run (a sweep's trial) created it meanwhile
        return client.get_experiment_by_name(experiment).experiment_id


def _artifact_location(tracking_uri: str, experiment: str) -> Optional[str]:
    """A new experiment's artifacts beside a SQLite store, in `mlartifacts/` as `mlflow server` keeps them: MLflow
    would put them in ./mlruns of whichever folder the command ran in. Other stores: their own default."""
    if not tracking_uri.startswith("sqlite:////"):
        return None
    folder = os.path.dirname(tracking_uri[len("sqlite:///") :])
    return os.path.join(folder, "mlartifacts", experiment.strip("/"))


def open_before_launch(tracking_cfg, run: storage.Folder, config: dict, parent_run_id: Optional[str], wait_s=20.0):
    """The driver opens the run's MLflow run before any worker starts, so that a run killed within seconds (a
    sweep's trial stopped by ASHA) has one too. Waits at most `wait_s`: a store that does not answer is left to
    rank 0's sender, which keeps trying."""
    opened: dict = {}

    def opening() -> None:
        try:
            opened["id"] = open_run(
                client_for(tracking_cfg.mlflow_uri), tracked_run(tracking_cfg, run, config, parent_run_id)
            )
        except Exception as err:  # noqa: BLE001 - the store's errors are many
            opened["error"] = err

    thread = threading.Thread(target=opening, name="aevb-mlflow-open", daemon=True)
    thread.start()
    thread.join(wait_s)
    if "id" not in opened:
        why = f"{type(opened['error']).__name__}: {first_line(opened['error'])}" if "error" in opened else "no answer"
        say(f"warning: MLflow at {tracking_cfg.mlflow_uri} did not open the run ({why}); rank 0 keeps trying")


def tracked_run(tracking_cfg, run: storage.Folder, config: dict, parent_run_id: Optional[str] = None) -> TrackedRun:
    """A training run's MLflow identity: named as its run folder, its config's leaves as params."""
    name = run.uri.rstrip("/").rsplit("/", 1)[-1]
    return TrackedRun(tracking_cfg.mlflow_uri, tracking_cfg.experiment, run, name, flat_params(config), parent_run_id)
