"""What the user reads: one-line messages on stderr, progress lines, and which errors are theirs.

A user's mistake (bad config, data or path, or a diverging run) is told in one line with no
traceback; every launcher and command decides that with `user_error_in`, written once here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import sys
import threading
import time
from typing import Optional

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError)
# What waiting cannot fix: a full disk or quota, a read-only file system, a refused permission. Never retried
# as a storage outage; told in one line, as a user's mistake is, since only the user can fix it.
UNFIXABLE_BY_WAITING = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def unfixable_by_waiting(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in UNFIXABLE_BY_WAITING


def is_user_error(err: BaseException) -> bool:
    """The user's to fix (bad input, or storage that waiting cannot fix): one line, no traceback."""
    return isinstance(err, USER_ERRORS) or unfixable_by_waiting(err)


class Interrupted(KeyboardInterrupt):
    """A signal ended the command (Ctrl-C's SIGINT, or SIGTERM from a scheduler): it exits with 128 + the
    signal's number, as a shell reports a process that signal ended (130 for SIGINT, 143 for SIGTERM), so
    `aevb-dist train ... && aevb-dist evaluate ...` stops there and a batch scheduler can requeue the job.
    `told`: the command has said already how it stopped."""

    def __init__(self, signum: int, told: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.told = signum, told

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


# logging's at-fork hook in the parent, which gives back the module lock its `before` hook took: `_afterFork` from
# Python 3.13, `_releaseLock` before.
_LOGGING_AFTER_FORK = getattr(logging, "_afterFork", None) or getattr(logging, "_releaseLock", None)


class SignalsHeard:
    """The signals this process receives from now to `close()`, through Python's wakeup fd (the one it had, if
    any, is given back, with what it would have heard meanwhile). A handler's exception that Python drops (one
    raised in a finalizer or an at-fork hook) is not printed as "Exception ignored" meanwhile: the signal is
    among those `close()` returns, for the caller to answer; where it cut logging's at-fork hook short, the lock
    that hook gives back is given back. Any other dropped exception is printed as before."""

    def __init__(self, exit_if_stuck_s: Optional[float] = None):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._previous_hook, self._dropped = sys.unraisablehook, []
        sys.unraisablehook = self._keep_signals_quiet
        self._early, self._closing, self._watch = b"", threading.Event(), None
        if exit_if_stuck_s is not None:
            self._watch = threading.Thread(
                target=self._exit_if_stuck, args=(exit_if_stuck_s,), name="aevb-stuck-start-up", daemon=True
            )
            self._watch.start()

    def _exit_if_stuck(self, grace_s: float) -> None:
        """A Ctrl-C or SIGTERM heard while the main thread stays in native code reaches no Python handler: in
        ray.init connecting to a GCS that the same signal (sent to the process group) ended, Ray gives up only
        after 60 s, and exits 1. `grace_s` after such a signal, if `close()` has not come, the process ends here
        as the handler would have ended it: 128 + the signal's number."""
        stops: list[int] = []
        while not stops:
            if self._closing.is_set():
                return
            if select.select([self._read], [], [], 0.1)[0]:
                with contextlib.suppress(BlockingIOError):
                    self._early += os.read(self._read, 512)
            stops = [s for s in self._early if s in (signal.SIGINT, signal.SIGTERM)]
        if self._closing.wait(grace_s):
            return
        name = signal.Signals(stops[0]).name
        say(f"{name} while the start-up does not answer ({grace_s:g} s): stopping now, with nothing to checkpoint")
        os._exit(128 + stops[0])

    def _keep_signals_quiet(self, unraisable) -> None:
        if not isinstance(unraisable.exc_value, (KeyboardInterrupt, SystemExit)):
            self._previous_hook(unraisable)
            return
        self._dropped.append(unraisable)  # a signal handler's (Ctrl-C's, or sys.exit in Ray's SIGTERM's)
        if unraisable.object is _LOGGING_AFTER_FORK:
            # Raised as logging's at-fork hook began, before it gave back the module lock it took for the fork:
            # held by this thread for good, every other thread's next log call would wait forever (the
            # command's exit handlers did). Given back here, as the hook would have.
            with contextlib.suppress(RuntimeError):  # not held after all
                _LOGGING_AFTER_FORK()

    def close(self) -> list[int]:
        self._closing.set()
        if self._watch is not None:
            self._watch.join()  # within its 0.1 s poll: what it read is in self._early
        signal.set_wakeup_fd(self._previous)
        sys.unraisablehook = self._previous_hook
        data = self._early
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._read, 512):
                data += chunk
        os.close(self._read)
        os.close(self._write)
        if data and self._previous != -1:
            with contextlib.suppress(OSError):
                os.write(self._previous, data)
        if not data:  # dropped, with no signal behind it: not ours to answer
            for unraisable in self._dropped:
                self._previous_hook(unraisable)
        return list(data)


def say(message: str) -> None:
    print(f"aevb-dist: {message}", file=sys.stderr, flush=True)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (or its type's name when it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def user_error_in(err: BaseException) -> Optional[ValueError]:
    """The user's mistake behind `err` (following `.cause`, as Ray wraps it, and `__cause__`), as a
    one-line ValueError; None when the failure is not the user's to fix."""
    seen: Optional[BaseException] = err
    while seen is not None:
        if is_user_error(seen):
            return ValueError(first_line(seen))
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


class Progress:
    """A line per update on stderr: done/total, rate, and time left."""

    def __init__(self, what: str, total: int, unit: str = "examples", min_interval_s: float = 2.0):
        self.what, self.total, self.unit, self.min_interval_s = what, total, unit, min_interval_s
        self.done, self.start, self.last = 0, time.perf_counter(), 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.min_interval_s or self.done >= self.total:
            self.last = now
            elapsed = now - self.start
            rate = self.done / max(elapsed, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            say(
                f"{self.what}: {self.done:,}/{self.total:,} {self.unit} | {rate:,.0f}/s | "
                f"{elapsed:,.0f} s elapsed, ~{left:,.0f} s left"
            )
