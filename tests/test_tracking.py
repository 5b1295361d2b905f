"""MLflow tracking (`tracking.mlflow_uri`): a real SQLite store and a real `mlflow server` on 127.0.0.1, read back
with MlflowClient. One MLflow run per training run, written by rank 0 alone; a resume continues it; a server that
stops answering never stops training, and gets the rows logged meanwhile when it answers again."""

import math
import os
import signal
import subprocess
import sys
import threading

import mlflow
import pytest
import yaml

from aevb_dist.config import absolute_local_uris, load_config
from aevb_dist.run import storage
from aevb_dist.run.metrics import read_metrics
from aevb_dist.tracking.mlflow_run import (
    METRIC_COLUMNS,
    RUN_ID_FILE,
    MlflowRun,
    TrackedRun,
    check_store,
    flat_params,
)
from tests.faults import wait_for
from tests.helpers import SMOKE, tiny_overrides
from tests.mlflow_server import MlflowServer


def _mlflow_runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


# -- the config keys -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, words",
    [
        (["tracking.mlflow_uri=s3://bucket/mlruns"], "is not an MLflow tracking URI"),
        (["tracking.experiment=vae"], "tracking.mlflow_uri is not"),
        (["tracking.mlflow_uri=' '"], "tracking.mlflow_uri is empty"),
        (["tracking.mlfow_uri=x"], "did you mean tracking.mlflow_uri"),
    ],
)
def test_a_wrong_tracking_key_is_one_line(overrides, words):
    with pytest.raises(ValueError, match=words):
        load_config(SMOKE, overrides)


def test_a_relative_sqlite_store_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = absolute_local_uris(load_config(SMOKE, ["tracking.mlflow_uri=sqlite:///m/ml.db"]))
    folder = absolute_local_uris(load_config(SMOKE, ["tracking.mlflow_uri=mlruns"]))
    absolute = absolute_local_uris(load_config(SMOKE, ["tracking.mlflow_uri=sqlite:////data/ml.db"]))
    server = absolute_local_uris(load_config(SMOKE, ["tracking.mlflow_uri=http://127.0.0.1:5000"]))
    assert relative.tracking.mlflow_uri == f"sqlite:///{tmp_path}/m/ml.db"
    assert folder.tracking.mlflow_uri == f"{tmp_path}/mlruns"
    assert absolute.tracking.mlflow_uri == "sqlite:////data/ml.db"
    assert server.tracking.mlflow_uri == "http://127.0.0.1:5000"


def test_a_store_mlflow_refuses_is_one_line_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match=r"tracking.mlflow_uri=.*mlruns: MLflow refuses it: .*file") as told:
        check_store(str(tmp_path / "mlruns"))  # MLflow 3.7+ keeps its folder store behind an opt-in
    assert "\n" not in str(told.value)


def test_params_are_the_configs_leaves():
    cfg = load_config(SMOKE, ["model.hidden_sizes=[8,4]", "train.free_bits=0.5"])
    params = flat_params({"model": {"hidden_sizes": [8, 4], "input_shape": None}, "train": {"compile": False}})
    assert params == {"model.hidden_sizes": "[8, 4]", "model.input_shape": "null", "train.compile": "false"}
    from aevb_dist.config import to_dict

    every = flat_params(to_dict(cfg))
    assert every["train.free_bits"] == "0.5" and every["tracking.mlflow_uri"] == "null"
    assert len(every) == sum(len(section) if isinstance(section, dict) else 1 for section in to_dict(cfg).values())


def test_a_run_that_ends_while_the_store_comes_back_is_told_it_answers_again(tmp_path, capfd):
    """The run's end can come while the store is away; the rows and the end are sent when it is back, and the user,
    told it did not answer, is told it answers again."""
    blocker = tmp_path / "store"
    blocker.write_text("")  # a file where the store's folder belongs: SQLite cannot open the database
    (tmp_path / "run").mkdir()
    store = f"sqlite:///{blocker}/mlflow.db"
    tracked = TrackedRun(store, "vae", storage.Folder.open(str(tmp_path / "run")), "ending", {"model.latent_dim": "2"})
    sender = MlflowRun(tracked, artifacts=(), retry_s=0.2, drain_s=120)
    sender.log_row({"step": 1, "train_elbo": -5.0, "time": 1.0})
    wait_for(lambda: "does not answer" in capfd.readouterr().err, timeout=60, interval=0.2)
    sender.log_row({"step": 2, "train_elbo": -4.0, "time": 2.0})
    threading.Timer(1.0, blocker.unlink).start()  # the store comes back while the run ends
    sender.finish("FINISHED")
    assert "answers again" in capfd.readouterr().err
    (run,) = _mlflow_runs(store, "vae")
    assert run.info.status == "FINISHED" and _history(store, run.info.run_id, "train_elbo") == [(1, -5.0), (2, -4.0)]


# -- a run in a real store -----------------------------------------------------------------------------------------
@pytest.mark.slow  # worker processes of local mode
def test_a_run_and_its_resume_are_one_mlflow_run_of_every_row(tiny_data, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the folder the command runs in
    store = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = tiny_overrides(
        tiny_data, str(tmp_path / "runs"), **{"ray.local_mode": "true", "train.num_workers": 2}
    ) + [f"tracking.mlflow_uri={store}", "tracking.experiment=vae", "run.name=tracked"]
    from aevb_dist.train.driver import train

    train(load_config(SMOKE, overrides + ["train.max_steps=12"]))
    (first,) = _mlflow_runs(store, "vae")  # rank 0 alone made a run: one, not one per worker
    assert first.info.status == "FINISHED" and first.info.run_name == "tracked"

    train(load_config(SMOKE, overrides + ["train.max_steps=20"]))  # resumed from step 12
    (resumed,) = _mlflow_runs(store, "vae")
    assert resumed.info.run_id == first.info.run_id and resumed.info.status == "FINISHED"
    run = storage.Folder.open(str(tmp_path / "runs" / "tracked"))
    assert first.info.run_id in run.fs.cat_file(run.file(RUN_ID_FILE)).decode()

    # params: the leaves of the config the run recorded when it began
    recorded = yaml.safe_load(open(tmp_path / "runs" / "tracked" / "config.yaml"))
    assert resumed.data.params == flat_params(recorded) | {"train.max_steps": "12"}
    # metrics: every metrics.csv row, at its step, for each column it fills
    rows = read_metrics(run.fs, run.file("metrics.csv"))
    assert [r["step"] for r in rows] == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    for key in ("train_elbo", "test_elbo", "samples_per_s", "learning_rate", "num_workers"):
        assert key in METRIC_COLUMNS
        expected = [(r["step"], r[key]) for r in rows if not math.isnan(r[key])]
        assert _history(store, resumed.info.run_id, key) == expected, key  # the same float64s
    client = mlflow.MlflowClient(store)
    assert {a.path for a in client.list_artifacts(resumed.info.run_id)} == {
        "metrics.csv",
        "config.yaml",
        "learning_curve.png",
    }
    assert resumed.data.tags["checkpoint_uri"] == f"{tmp_path}/runs/tracked/checkpoint_0000000020"
    # the artifacts beside the store, not in ./mlruns of the folder the command ran in
    assert sorted(os.listdir(tmp_path / "mlartifacts" / "vae" / resumed.info.run_id / "artifacts")) == [
        "config.yaml",
        "learning_curve.png",
        "metrics.csv",
    ]
    assert not os.path.exists(tmp_path / "elsewhere" / "mlruns")


@pytest.mark.slow  # a real mlflow server, stopped and started again, and a training command
def test_a_tracking_server_that_stops_answering_never_stops_training(tiny_data, tmp_path):
    """The run outlasts the outage whatever this machine's speed: it has steps to spare and is ended by Ctrl-C
    once the rows logged during the outage have reached the server."""
    server = MlflowServer(str(tmp_path)).start()
    overrides = tiny_overrides(
        tiny_data,
        str(tmp_path / "runs"),
        **{
            "ray.local_mode": "true",
            "model.hidden_sizes": "[256,256]",
            "train.max_steps": 1_000_000,
            "train.log_every_steps": 10,
            "train.eval_every_steps": 0,
            "checkpoint.every_steps": 500,
        },
    )
    command = [sys.executable, "-m", "aevb_dist", "train", SMOKE, *overrides, "run.name=outage"]
    command += [f"tracking.mlflow_uri={server.uri}", "tracking.experiment=outage"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = storage.Folder.open(str(tmp_path / "runs" / "outage"))
    logged = lambda: [r["step"] for r in read_metrics(run.fs, run.file("metrics.csv"))]  # noqa: E731
    try:

        def sent_steps() -> list[int]:
            runs = _mlflow_runs(server.uri, "outage")
            return [step for step, _ in _history(server.uri, runs[0].info.run_id, "train_elbo")] if runs else []

        wait_for(lambda: len(sent_steps()) >= 2, timeout=180, interval=0.5)
        run_id = _mlflow_runs(server.uri, "outage")[0].info.run_id
        server.stop()
        steps_when_stopped = logged()[-1]
        wait_for(lambda: logged()[-1] >= steps_when_stopped + 50 or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, "training should still be going while the server is away"
        during_outage = logged()[-1]
        server.start()
        wait_for(lambda: during_outage in sent_steps() or proc.poll() is not None, timeout=120, interval=0.5)
        proc.send_signal(signal.SIGINT)  # the run's end: a checkpoint and the rows not yet sent
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 130, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()

    assert err.count("does not answer") == 1 and "answers again" in err, err[-3000:]
    steps = logged()
    # no row lost from metrics.csv: every tenth step, then the step Ctrl-C checkpointed
    assert steps[:-1] == [1, *range(10, steps[-2] + 1, 10)] and steps[-1] > steps[-2]
    assert steps[-2] >= during_outage > steps_when_stopped
    server.start()
    try:
        history = _history(server.uri, run_id, "train_elbo")
        runs = _mlflow_runs(server.uri, "outage")
    finally:
        server.stop()
    assert [step for step, _ in history] == steps  # every row, those logged while away included
    assert len(runs) == 1 and runs[0].info.status == "KILLED"  # stopped by a request
