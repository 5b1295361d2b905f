"""One writer per run: a lease object in the run folder, renewed by a heartbeat.

`lease.json` names its owner (host, pid, command start) and holds the time of its last heartbeat.
A second `aevb-dist train` on the same run finds a live lease and stops before writing anything;
a lease whose heartbeat stopped longer than `run.lease_timeout_s` ago (a killed driver) is taken
over, and the newcomer says so. Every write is conditional, so two drivers can never both believe
they hold it: on local disk under an exclusive `flock` of a sibling lock file; on S3 with
`If-None-Match: *` to create and `If-Match: <etag>` to renew or take over (a heartbeat that finds
another owner's lease has lost it, and the run stops).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

from aevb_dist import storage
from aevb_dist.console import first_line, say

LEASE = "lease.json"


class LeaseHeld(ValueError):
    """Another live writer holds the run."""


class _LocalLeaseFile:
    """Conditional writes on local disk: read-compare-write under an exclusive flock."""

    def __init__(self, path: str):
        self.path, self.lock_path = path, f"{path}.lock"

    @contextlib.contextmanager
    def _locked(self):
        with open(self.lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self) -> tuple[Optional[dict], Optional[str]]:
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None, None
        return json.loads(text), text

    def read(self) -> tuple[Optional[dict], Optional[str]]:
        with self._locked():
            return self._read()

    def write_if(self, data: dict, expected: Optional[str]) -> Optional[str]:
        """Write `data` if the file's version is still `expected` (None: absent); its new version, or None."""
        text = json.dumps(data)
        with self._locked():
            if self._read()[1] != expected:
                return None
            with open(f"{self.path}.tmp", "w") as f:
                f.write(text)
            os.replace(f"{self.path}.tmp", self.path)
        return text

    def delete_if(self, expected: str) -> None:
        with self._locked():
            if self._read()[1] == expected:
                os.remove(self.path)


class _S3LeaseObject:
    """Conditional writes on S3 (and S3-compatible stores that implement them): the ETag is the version."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[Optional[dict], Optional[str]]:
        try:
            info = self.fs.info(self.path)
            return json.loads(self.fs.cat_file(self.path)), info["ETag"]
        except FileNotFoundError:
            return None, None

    def write_if(self, data: dict, expected: Optional[str]) -> Optional[str]:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            out = self.fs.pipe_file(self.path, json.dumps(data).encode(), **condition)
        except FileExistsError:  # If-None-Match failed (s3fs's name for it): someone else created it first
            return None
        except OSError as err:  # If-Match failed (412, PreconditionFailed) or lost a race (409)
            cause = f"{err} {err.__cause__}"
            if "PreconditionFailed" in cause or "ConditionalRequestConflict" in cause:
                return None
            raise
        return (out or {}).get("ETag") or self.fs.info(self.path)["ETag"]

    def delete_if(self, expected: str) -> None:
        if self.read()[1] == expected:
            self.fs.rm(self.path)


class RunLease:
    """Held from `acquire()` to `release()`; a daemon thread renews it every `timeout_s / 4`."""

    def __init__(self, run: storage.Folder, timeout_s: float, on_lost: Optional[Callable[[str], None]] = None):
        self._file: Optional[object] = None
        if storage.is_local(run.fs):
            run.fs.makedirs(run.path, exist_ok=True)
            self._file = _LocalLeaseFile(run.file(LEASE))
        elif storage.scheme_of(run.uri) == "s3":
            self._file = _S3LeaseObject(run.fs, run.file(LEASE))
        else:
            say(f"warning: {run.uri}: one writer per run is not enforced on {storage.scheme_of(run.uri)}:// "
                "(no conditional writes implemented for it); do not start this run twice")
        self.run, self.timeout_s, self.on_lost = run, timeout_s, on_lost
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.time()}
        self._version: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self) -> dict:
        return {**self.owner, "heartbeat": time.time(), "timeout_s": self.timeout_s}

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming the live owner; a stale lease is taken over, said aloud."""
        if self._file is None:
            return
        held, version = self._file.read()
        if held is not None:
            age = time.time() - float(held.get("heartbeat", 0))
            who = f"pid {held.get('pid')} on {held.get('host')}"
            if age < self.timeout_s:
                raise LeaseHeld(f"{self.run.uri} is being trained by {who} (heartbeat {age:.0f} s ago); a second "
                                "writer would corrupt it: wait for that run to end, stop it, or use another run.name")
            say(f"taking over {self.run.uri} from {who}, whose heartbeat stopped {age:.0f} s ago "
                f"(run.lease_timeout_s={self.timeout_s:g})")
        self._version = self._file.write_if(self._record(), version)
        if self._version is None:
            raise LeaseHeld(f"{self.run.uri}: another run took its lease at the same moment; try again")
        self._thread = threading.Thread(target=self._beat, name="aevb-run-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                version = self._file.write_if(self._record(), self._version)
            except Exception as err:  # a storage hiccup: the next beat tries again, well within the timeout
                say(f"warning: could not renew the lease of {self.run.uri}: {type(err).__name__}: {first_line(err)}")
                continue
            if version is None:
                if self.on_lost is not None:
                    self.on_lost(f"{self.run.uri}: another run took over this run's lease; stopping")
                return
            self._version = version

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._version is not None:
            try:
                self._file.delete_if(self._version)
            except Exception as err:  # storage down: the lease goes stale and is taken over later
                say(f"warning: could not release the lease of {self.run.uri}: {type(err).__name__}")
            self._version = None

    def __enter__(self) -> "RunLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
