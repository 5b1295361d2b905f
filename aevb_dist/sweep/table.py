"""The sweep's live table of trials, printed by a Ray Tune callback on the sweep's driver (Tune's own is off):
a line when a trial starts, ends or fails, and the whole table every `every_s` while trials run."""

from __future__ import annotations

import time

from ray.tune import Callback

from aevb_dist.console import say
from aevb_dist.sweep.space import Space
from aevb_dist.sweep.trials import trial_name


def format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TrialTable(Callback):
    def __init__(self, space: Space, metric: str, every_s: float = 30.0):
        self.space, self.metric, self.every_s = space, metric, every_s
        self.latest: dict[str, dict] = {}  # the newest result of each trial
        self._printed_at = time.monotonic()

    def _values(self, trial) -> str:
        return " ".join(f"{d.key}={format_value(trial.config.get(d.key))}" for d in self.space.searched)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        say(f"{trial_name(trial)} started: {self._values(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.latest[trial.trial_id] = result

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        say(f"{trial_name(trial)} ended: {self._latest(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        say(f"{trial_name(trial)} failed: {self._latest(trial)} (its error: {trial.path}/error.txt)")

    def _latest(self, trial) -> str:
        result = self.latest.get(trial.trial_id, {})
        value = result.get(self.metric)
        metric = f"{self.metric} {value:.2f}" if isinstance(value, float) else f"no {self.metric} yet"
        return f"step {result.get('step', 0)}, {metric}"

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self._printed_at < self.every_s:
            return
        self._printed_at = time.monotonic()
        say(self.table(trials))

    def table(self, trials) -> str:
        keys = [d.key for d in self.space.searched]
        header = ["trial", "state", *keys, "step", self.metric]
        rows = [header]
        for trial in sorted(trials, key=trial_name):
            result = self.latest.get(trial.trial_id, {})
            value = result.get(self.metric)
            rows.append(
                [
                    trial_name(trial),
                    trial.status,
                    *(format_value(trial.config.get(k)) for k in keys),
                    str(result.get("step", "")),
                    f"{value:.2f}" if isinstance(value, float) else "",
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        return "trials:\n" + "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
