"""Stopping a run cleanly: Ctrl-C or SIGTERM of `aevb-dist train` writes a checkpoint at the next step, then exits.

The driver does not reach into the workers (on a cluster they are on other machines): it writes a small
request object into the run folder, `stop_request.json`. Rank 0 looks for it every `POLL_S` seconds in a
background thread (one GET; never on the step's path), and votes to stop through the step's all-reduce
(collectives.STOP_VOTES), so every rank stops after the same step, writes the checkpoint of that step and
returns. A second Ctrl-C stops at once (the newest complete checkpoint is then the resume point), and so does
the first one before training's first step (nothing to checkpoint yet). Either way the command then exits with
128 + the signal's number (console.Interrupted), as it does after the checkpoint when a signal stopped the run
before its end.

The driver removes a request left by an earlier run before it starts the workers, so a request only ever
stops the run that was running when it was made.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Callable, Iterator, Optional

from aevb_dist.console import Interrupted, first_line, say
from aevb_dist.run import storage

FILE_NAME = "stop_request.json"
POLL_S = 2.0  # at most this long (plus a step) from the request to the workers' checkpoint


def clear(run: storage.Folder) -> None:
    """Remove a request an earlier run left behind (e.g. its driver was killed before the workers saw it)."""
    try:
        run.fs.rm(run.file(FILE_NAME))
    except FileNotFoundError:
        pass


def request(run: storage.Folder, reason: str) -> None:
    run.fs.pipe_file(run.file(FILE_NAME), json.dumps({"reason": reason, "time": time.time()}).encode())


class StopRequestWatch:
    """Rank 0's view of the run folder's stop request: `requested` turns true once the request is there."""

    def __init__(self, run: storage.Folder, poll_s: float = POLL_S):
        self.run, self.poll_s = run, poll_s
        self.requested = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aevb-stop-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(self.poll_s):
            try:
                self.run.fs.cat_file(self.run.file(FILE_NAME))  # a GET: never a cached listing
            except FileNotFoundError:
                continue
            except Exception:  # storage unreachable: the checkpoint writer says so; look again next time
                continue
            self.requested = True
            return

    def close(self) -> None:
        self._done.set()


class SignalsSeen:
    """What `stop_on_signals` saw: the signal that asked the run to stop (None while none has)."""

    def __init__(self):
        self.signum: Optional[int] = None


@contextlib.contextmanager
def stop_on_signals(
    run: storage.Folder, training_began: Callable[[], bool], before_training: str = "with nothing to checkpoint"
) -> Iterator[SignalsSeen]:
    """While the workers run: the first Ctrl-C or SIGTERM asks them to stop at the next step (written into the
    run folder in a thread: a signal handler must not wait on storage), the second stops at once. Before
    `training_began` (Ray still starting, workers still loading) there is no step to checkpoint: the first
    signal stops at once, saying `before_training`, instead of starting training only to stop it.
    (`training_began` may read metrics.csv, within a bound: the driver's `ProgressPrinter.trained_past_start_now`.)"""
    seen, command = SignalsSeen(), os.getpid()

    def on_signal(signum, frame) -> None:
        if os.getpid() != command:
            # A child forked from the command that runs Python before its exec (Ray's preexec_fn, as it starts
            # its processes) and got the terminal's Ctrl-C: the command answers it, once.
            return
        name = signal.Signals(signum).name
        if seen.signum is not None:
            say(f"{name} again: stopping at once; the newest complete checkpoint in {run.uri} is kept")
            raise Interrupted(signum, told=True)
        seen.signum = signum
        if not training_began():
            say(f"{name} before training's first logged step: stopping now, {before_training}")
            raise Interrupted(signum, told=True)
        say(
            f"{name}: stopping after the next step, with a checkpoint of it "
            "(Ctrl-C again to stop at once, losing the steps since the last checkpoint)"
        )
        threading.Thread(target=_write_request, args=(run, name), daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _write_request(run: storage.Folder, reason: str) -> None:
    try:
        request(run, reason)
    except Exception as err:
        say(
            f"warning: could not write the stop request into {run.uri} ({type(err).__name__}: {first_line(err)}); "
            "Ctrl-C again to stop at once"
        )


def maybe_stop_on_signals(run: storage.Folder, *args) -> contextlib.AbstractContextManager:
    """`stop_on_signals`, where signal handlers can be installed: from the main thread only (tests call `train`
    from others)."""
    main = threading.current_thread() is threading.main_thread()
    return stop_on_signals(run, *args) if main else contextlib.nullcontext(SignalsSeen())
