"""A finished sweep for people: `SWEEP/trials.csv` (a row a trial), `SWEEP/best.yaml` (the best trial's whole
config, runnable with `aevb-dist train`) and `SWEEP/<metric>_by_value.png` (the metric against each searched key).

Read from the trials' own run folders (config.yaml, metrics.csv), so the files say what the runs hold."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from typing import Optional

from aevb_dist.config import config_from_dict, to_yaml
from aevb_dist.config.schema import Config
from aevb_dist.run import storage
from aevb_dist.run.metrics import read_metrics
from aevb_dist.run.uri import join
from aevb_dist.sweep.space import Space


@dataclass(frozen=True)
class TrialRow:
    trial: str  # its run folder's name: trial_00003
    state: str  # done, stopped_early (ASHA), stopped (Ctrl-C, resumable) or error
    values: dict  # the searched keys' values
    step: int  # the last logged step
    total_steps: int  # the run's planned length
    metric: float  # the sweep's metric, as last logged (NaN: never)
    run_uri: str
    error: str = ""


def trial_rows(folder: storage.Folder, grid, space: Space, metric: str) -> list[TrialRow]:
    from aevb_dist.sweep.tuning import SweepStopped

    rows = []
    for result in grid:
        # Tune's folder for the trial: trial_NNNNN, with a suffix of Tune's where a restarted trial made it again
        name = re.match(r"(trial_\d+)", result.path.rstrip("/").rsplit("/", 1)[-1]).group(1)
        run = storage.Folder(join(folder.uri, name), folder.fs, folder.file(name))
        logged = read_metrics(run.fs, run.file("metrics.csv"))
        step = logged[-1]["step"] if logged else 0
        values = [r[metric] for r in logged if not math.isnan(r[metric])]
        total = _planned_steps(run)
        if result.error is not None:
            stopped = isinstance(result.error, SweepStopped) or "SweepStopped" in str(result.error)
            state, error = ("stopped", "") if stopped else ("error", str(result.error).splitlines()[-1][:300])
        else:
            state, error = ("done" if total is None or step >= total else "stopped_early"), ""
        rows.append(
            TrialRow(
                trial=name,
                state=state,
                values={d.key: result.config.get(d.key) for d in space.searched},
                step=step,
                total_steps=total or 0,
                metric=values[-1] if values else math.nan,
                run_uri=run.uri,
                error=error,
            )
        )
    return sorted(rows, key=lambda r: r.trial)


def _planned_steps(run: storage.Folder) -> Optional[int]:
    """The trial's run length as its driver planned it (from its config.yaml); None where it never began."""
    from omegaconf import OmegaConf

    from aevb_dist.train.datasets import open_datasets
    from aevb_dist.train.driver import plan_run

    if not run.fs.exists(run.file("config.yaml")):
        return None
    cfg = config_from_dict(OmegaConf.to_container(OmegaConf.create(run.fs.cat_file(run.file("config.yaml")).decode())))
    train_data, _ = open_datasets(cfg)
    return plan_run(cfg, train_data, run.uri, None, None).total_steps


def best_trial(rows: list[TrialRow]) -> Optional[TrialRow]:
    """The trial whose metric, as last logged, is highest; trials stopped by Ctrl-C or failed do not count."""
    ranked = [r for r in rows if r.state in ("done", "stopped_early") and not math.isnan(r.metric)]
    return max(ranked, key=lambda r: r.metric) if ranked else None


def write_results(folder: storage.Folder, rows: list[TrialRow], space: Space, metric: str, sweep_name: str) -> dict:
    """trials.csv, best.yaml and the plot into the sweep's folder; returns their URIs (best: None without one)."""
    keys = [d.key for d in space.searched]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial", "state", *keys, "step", "total_steps", metric, "run_uri", "error"])
    for r in rows:
        writer.writerow(
            [r.trial, r.state, *(r.values[k] for k in keys), r.step, r.total_steps, r.metric, r.run_uri, r.error]
        )
    folder.fs.pipe_file(folder.file("trials.csv"), out.getvalue().encode())
    written = {"trials": join(folder.uri, "trials.csv"), "best": None, "plot": None}
    best = best_trial(rows)
    if best is not None:
        folder.fs.pipe_file(folder.file("best.yaml"), best_config_yaml(folder, best, sweep_name).encode())
        written["best"] = join(folder.uri, "best.yaml")
    if keys and any(not math.isnan(r.metric) for r in rows):
        folder.fs.pipe_file(folder.file(f"{metric}_by_value.png"), _plot(rows, space, metric, sweep_name))
        written["plot"] = join(folder.uri, f"{metric}_by_value.png")
    return written


def best_config_yaml(folder: storage.Folder, best: TrialRow, sweep_name: str) -> str:
    """The best trial's config as its run recorded it, as a new run: `{sweep}_best` beside the sweep's folder."""
    import dataclasses

    from omegaconf import OmegaConf

    text = folder.fs.cat_file(folder.file(f"{best.trial}/config.yaml")).decode()
    cfg: Config = config_from_dict(OmegaConf.to_container(OmegaConf.create(text)))
    parent = folder.uri.rstrip("/").rsplit("/", 1)[0]
    run = dataclasses.replace(cfg.run, name=f"{sweep_name}_best", storage_uri=parent)
    header = (
        f"# The best trial of the sweep {sweep_name}: {best.trial} ({best.metric:.4f}), as its run recorded it.\n"
        f"# `aevb-dist train` on this file trains it anew as run {run.name} in {parent}.\n"
    )
    return header + to_yaml(dataclasses.replace(cfg, run=run))


def _plot(rows: list[TrialRow], space: Space, metric: str, title: str) -> bytes:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = space.searched
    fig, axes = plt.subplots(1, len(dims), figsize=(4 * len(dims), 3.5), squeeze=False)
    scored = [r for r in rows if not math.isnan(r.metric)]
    for ax, d in zip(axes[0], dims):
        xs = [r.values[d.key] for r in scored]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:  # categories, in the order the space lists them
            order = [str(v) for v in d.values]
            xs = [order.index(str(x)) if str(x) in order else len(order) for x in xs]
            ax.set_xticks(range(len(order)), order, rotation=30)
        early = [r.state == "stopped_early" for r in scored]
        for stopped, marker, label in ((False, "o", "ran to the end"), (True, "x", "stopped early (ASHA)")):
            points = [(x, r.metric) for x, r, e in zip(xs, scored, early) if e == stopped]
            if points:
                ax.scatter(*zip(*points), s=24, marker=marker, label=label)
        if d.is_log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.set_xlabel(d.key)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
