"""`aevb-dist sweep`: the search space read and checked by the schema before any trial, and real sweeps on Ray Tune
over the embedded Ray: trials.csv, best.yaml that trains, ASHA stopping trials early, and a killed driver's sweep
resumed with exactly the requested trials, none that had a checkpoint started again from step 0."""

import csv
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from aevb_dist.config import load_config
from aevb_dist.sweep.driver import _check_options, sweep
from aevb_dist.sweep.space import Dimension, check_space, read_space, trial_overrides
from aevb_dist.sweep.tuning import SweepOptions
from tests.faults import SLOW, wait_for
from tests.helpers import SMOKE, tiny_overrides


def _space(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


# -- the space -----------------------------------------------------------------------------------------------------
def test_a_space_names_tunes_samplers(tmp_path):
    space = read_space(
        _space(
            tmp_path,
            "optim.lr: loguniform(1e-4, 1e-2)\n"
            "model: {latent_dim: 'choice(5, 10, 20)'}\n"
            "train.estimator: grid(B, iwae)\n"
            "train.kl_warmup_steps: randint(0, 5000)\n"
            "train.free_bits: uniform(0.0, 0.5)\n"
            "optim.name: adam\n",
        )
    )
    assert space.dimensions == (
        Dimension("optim.lr", "loguniform", (1e-4, 1e-2)),
        Dimension("model.latent_dim", "choice", (5, 10, 20)),
        Dimension("train.estimator", "grid", ("B", "iwae")),
        Dimension("train.kl_warmup_steps", "randint", (0, 5000)),
        Dimension("train.free_bits", "uniform", (0.0, 0.5)),
        Dimension("optim.name", "fixed", ("adam",)),
    )
    assert space.grid_size == 2 and [d.key for d in space.searched] == space.keys[:5]
    overrides = trial_overrides(space, {k: v for k, v in zip(space.keys, [0.001, 10, "B", 7, 0.25, "adam"])})
    cfg = load_config(SMOKE, overrides)
    assert (cfg.optim.lr, cfg.model.latent_dim, cfg.train.estimator, cfg.optim.name) == (0.001, 10, "B", "adam")


@pytest.mark.parametrize(
    "text, words",
    [
        ("optim.lr: logunifrm(1e-4, 1e-2)\n", "unknown sampler 'logunifrm'"),
        ("optim.lr: loguniform(0, 1e-2)\n", "needs 0 < low"),
        ("optim.lr: uniform(0.1, 0.01)\n", "needs low < high"),
        ("train.kl_warmup_steps: randint(0, 1.5)\n", "takes integers"),
        ("optim.lr: uniform(1)\n", "takes two numbers"),
        ("- optim.lr\n", "must map config keys to samplers"),
        ("optim.lr: [1, 2\n", "not valid YAML"),
    ],
)
def test_a_space_the_reader_cannot_take_is_one_line(tmp_path, text, words):
    with pytest.raises(ValueError, match=words) as told:
        read_space(_space(tmp_path, text))
    assert "\n" not in str(told.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("optim.lrate: loguniform(1e-4, 1e-2)\n", r"unknown config key 'optim.lrate'; allowed keys in optim: name, lr"),
        ("train.estimator: choice(B, Z)\n", r"train.estimator=\"Z\": .*is not allowed"),
        ("model.latent_dim: uniform(2, 8)\n", r"model.latent_dim=5.0: .*wrong type"),  # a float for an int
        ("train.kl_warmup_steps: randint(-5, 10)\n", r"train.kl_warmup_steps=-5"),
    ],
)
def test_every_value_a_trial_may_take_is_checked_before_any_trial(tmp_path, text, words):
    path = _space(tmp_path, text)
    with pytest.raises(ValueError, match=words) as told:
        check_space(load_config(SMOKE), read_space(path), path)
    assert str(told.value).startswith(f"search space {path}: ") and "\n" not in str(told.value)


def test_options_that_cannot_work_are_refused(tiny_data):
    cfg = load_config(SMOKE, tiny_overrides(tiny_data, "runs", **{"train.eval_every_steps": 0}))
    with pytest.raises(ValueError, match="train.eval_every_steps"):
        _check_options(cfg, SweepOptions(name="s", scheduler="asha"))
    with pytest.raises(ValueError, match="needs data.test_uri"):
        _check_options(
            load_config(SMOKE, [f"data.train_uri={tiny_data}/train", "data.test_uri=null"]), SweepOptions(name="s")
        )
    with pytest.raises(ValueError, match="--num-samples=0"):
        _check_options(cfg, SweepOptions(name="s", num_samples=0))


# -- sweeps on the embedded Ray ------------------------------------------------------------------------------------
SPACE = "optim.lr: loguniform(0.005, 0.2)\nmodel.latent_dim: choice(2, 4)\n"


def _read_trials(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # Ray Tune and Ray Train on the embedded Ray
def test_a_sweep_with_asha_writes_its_trials_and_a_best_config_that_trains(ray_head, tiny_data, tmp_path):
    """With a second Ray running on this machine (`ray_head`), whose presence once kept every trial's CPUs
    reserved after its end, so that the third trial waited forever. Two of the four trials barely learn (lr 1e-6);
    the fourth is one of them whatever order the grid comes in, and it starts once two trials have ended: at its
    first rung ASHA compares it with theirs, whichever trials ran beside each other."""
    space = _space(tmp_path, "optim.lr: grid(0.1, 0.000001)\nmodel.latent_dim: grid(2, 4)\n")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(
        SMOKE,
        tiny_overrides(tiny_data, str(tmp_path / "runs"), **{"train.max_steps": 32})
        + [f"tracking.mlflow_uri={store}", "tracking.experiment=sweeps"],
    )
    outcome = sweep(cfg, space, SweepOptions(name="asha", num_samples=1, scheduler="asha", max_concurrent=2))

    trials = _read_trials(str(tmp_path / "runs" / "asha" / "trials.csv"))
    assert len(trials) == 4 and {t["trial"] for t in trials} == {f"trial_0000{i}" for i in range(4)}
    assert set(trials[0]) >= {"trial", "state", "optim.lr", "model.latent_dim", "step", "test_elbo", "run_uri"}
    assert any(t["state"] == "stopped_early" and int(t["step"]) < 32 for t in trials)  # ASHA cut some short
    for t in trials:  # each trial is an ordinary run folder, with the values the table says
        run = load_config(os.path.join(t["run_uri"], "config.yaml"))
        assert math.isclose(run.optim.lr, float(t["optim.lr"])) and run.model.latent_dim == int(t["model.latent_dim"])
    best = outcome["best"]
    assert best.metric == max(float(t["test_elbo"]) for t in trials if t["state"] in ("done", "stopped_early"))
    assert os.path.exists(tmp_path / "runs" / "asha" / "test_elbo_by_value.png")

    # MLflow: the sweep is a parent run, each trial a child; those ASHA killed are ended as KILLED
    import mlflow

    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "asha"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == [t["trial"] for t in trials] and len(runs) == 5
    assert parent.info.status == "FINISHED" and "trials.csv" in {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    for t in trials:
        assert children[t["trial"]].info.status == ("FINISHED" if t["state"] == "done" else "KILLED")

    from aevb_dist.train.driver import train

    best_cfg = load_config(str(tmp_path / "runs" / "asha" / "best.yaml"), ["ray.local_mode=true", "train.max_steps=8"])
    assert best_cfg.optim.lr == pytest.approx(best.values["optim.lr"]) and best_cfg.run.name == "asha_best"
    assert train(best_cfg)["step"] == 8  # a new run, beside the sweep's folder


@pytest.mark.slow  # starts a Ray in this process
def test_a_ray_this_process_started_without_a_dashboard_is_refused_in_one_line(tiny_data, tmp_path):
    import ray

    cfg = load_config(SMOKE, tiny_overrides(tiny_data, str(tmp_path)))
    space = _space(tmp_path, SPACE)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with pytest.raises(ValueError, match="this process's Ray serves no dashboard.*include_dashboard=True"):
            sweep(cfg, space, SweepOptions(name="nodash", num_samples=2))
        assert ray.is_initialized()  # the user's Ray is left as it was
    finally:
        ray.shutdown()
    assert not (tmp_path / "nodash" / "trial_00000").exists()


@pytest.mark.slow  # a sweep's driver killed part way, and the same command again
def test_a_killed_sweep_resumes_with_exactly_its_trials_none_restarted_from_scratch(tiny_data, tmp_path):
    space = _space(tmp_path, SPACE)
    overrides = tiny_overrides(
        tiny_data,
        str(tmp_path / "runs"),
        **{
            "train.max_steps": 300,
            "train.log_every_steps": 10,
            "checkpoint.every_steps": 20,
            "model.hidden_sizes": "[64]",
        },
    )
    command = [sys.executable, "-m", "aevb_dist", "sweep", SMOKE, *overrides, "--space", space]
    command += ["--num-samples", "4", "--max-concurrent", "2", "--name", "killed"]
    folder = tmp_path / "runs" / "killed"

    def checkpointed() -> list[str]:
        if not folder.exists():
            return []
        return [
            t.name for t in folder.iterdir() if t.name.startswith("trial_") and any(t.glob("checkpoint_*/manifest*"))
        ]

    first = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        wait_for(lambda: checkpointed() or first.poll() is not None, timeout=300, interval=0.5)
        assert first.poll() is None, first.stderr.read()[-3000:]
        # what was there before the kill (a worker may outlive its driver for a moment, and checkpoint further)
        had_checkpoint = {name: _newest_checkpoint_step(folder / name) for name in checkpointed()}
        killed_at = time.time()
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the embedded Ray it started, as a lost machine would
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    time.sleep(1.0)

    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the sweep killed" in again.stderr
    trials = _read_trials(str(folder / "trials.csv"))
    assert len(trials) == 4 and all(t["state"] == "done" and t["step"] == "300" for t in trials), trials
    assert had_checkpoint
    for name, step in had_checkpoint.items():
        rows = list(csv.DictReader(open(folder / name / "metrics.csv")))
        assert [int(r["step"]) for r in rows] == [1, *range(10, 301, 10)]
        # resumed, not trained from step 0 again: the rows up to its checkpoint are the killed driver's
        assert all(float(r["time"]) < killed_at for r in rows if int(r["step"]) <= step), (name, step)
        assert any(float(r["time"]) > killed_at for r in rows)


def _newest_checkpoint_step(run: "os.PathLike") -> int:
    from aevb_dist.run import checkpoint, storage

    fs, path = storage.resolve(str(run))
    return checkpoint.manifest_step(fs, checkpoint.latest(fs, path))


@pytest.mark.slow  # a sweep interrupted with Ctrl-C, and the same command again
def test_ctrl_c_stops_every_trial_with_a_checkpoint_and_the_same_command_resumes(tiny_data, tmp_path):
    space = _space(tmp_path, "optim.lr: grid(0.01, 0.05)\n")
    overrides = tiny_overrides(
        tiny_data,
        str(tmp_path / "runs"),
        **{**SLOW, "train.max_steps": 1500, "checkpoint.every_steps": 5000},
    )
    command = [sys.executable, "-m", "aevb_dist", "sweep", SMOKE, *overrides, "--space", space]
    command += ["--max-concurrent", "2", "--name", "interrupted"]
    folder = tmp_path / "runs" / "interrupted"
    runs = [folder / "trial_00000", folder / "trial_00001"]

    def logged(run) -> list[dict]:
        try:
            return list(csv.DictReader(open(run / "metrics.csv")))
        except FileNotFoundError:
            return []

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: all(len(logged(r)) >= 3 for r in runs) or first.poll() is not None, timeout=300, interval=0.5)
        assert first.poll() is None, first.stderr.read()[-3000:]
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=240)
        ended_at = time.time()
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "every trial checkpoints its next step and stops" in err and "run the same command to resume" in err
    stopped = {}
    for run in runs:  # no checkpoint was due before the end: the one there is the stop's, at the last row
        last = int(logged(run)[-1]["step"])
        assert _newest_checkpoint_step(run) == last < 1500
        stopped[run.name] = last

    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _read_trials(str(folder / "trials.csv"))
    assert len(trials) == 2 and all(t["state"] == "done" and t["step"] == "1500" for t in trials), trials
    for run in runs:
        rows = logged(run)
        # every log step once, and the row of the step where it stopped
        assert [int(r["step"]) for r in rows] == sorted({1, *range(10, 1501, 10), stopped[run.name]})
        # resumed from the stop's checkpoint: the rows up to it are the first command's
        assert all(float(r["time"]) < ended_at for r in rows if int(r["step"]) <= stopped[run.name])
        assert all(float(r["time"]) > ended_at for r in rows if int(r["step"]) > stopped[run.name])
