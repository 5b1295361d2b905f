"""One writer per run: a lease object in the run folder, renewed by a heartbeat.

`lease.json` names its owner (host, the machine's boot and pid namespace, pid and the process's
start time) and holds the time of its last heartbeat. A second `aevb-dist train` on the same run
finds a live lease and stops before writing anything. A dead owner is recognised as fast as it can be:
- on the owner's own machine, by its process: a pid that is gone, or now names a process started at
  another time (pids are reused), is a dead owner, taken over at once once the run's writing worker
  (rank 0, which records itself in `writer.json`) is gone too;
- from another machine, by its heartbeat: a lease that missed a beat is waited out until
  `run.lease_timeout_s` has passed since its last one (the wait said in one line; `wait=False`
  refuses instead), and one still beating is refused at once.
Every write is conditional, so two drivers can never both believe they hold it: on local disk under an
exclusive `flock` of a sibling lock file; on S3 with
`If-None-Match: *` to create and `If-Match: <etag>` to renew or take over (a heartbeat that finds
another owner's lease has lost it, and the run stops).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time
import uuid
from typing import Callable, Optional

from aevb_dist.console import first_line, say
from aevb_dist.run import storage

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


def _machine() -> str:
    """Which kernel and pid namespace a pid belongs to: two containers (or two boots) of one host name
    do not share pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:  # not Linux: the host name alone
        return ""


def process_start(pid: int) -> Optional[int]:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); None if there is none,
    or only its zombie (it has exited; its parent has not collected it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the fields after the name, which may hold spaces
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def process_identity(pid: Optional[int] = None) -> dict:
    """What names a process for as long as it lives, and never another one afterwards."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "machine": _machine(), "pid": pid, "pid_start": process_start(pid)}


def process_state(record: dict) -> str:
    """ "alive" or "gone" for a process recorded by `process_identity` on this machine; "unknown" for one of
    another machine (or a record too old to tell: no machine, start time, or a pid that is alive)."""
    if (
        record.get("host") != socket.gethostname()
        or record.get("machine", "") != _machine()
        or not isinstance(record.get("pid"), int)
    ):
        return "unknown"
    start = process_start(record["pid"])
    if start is None:
        return "gone"
    if record.get("pid_start") is None:
        return "unknown"
    return "alive" if start == record["pid_start"] else "gone"  # a reused pid names another process


WRITER = "writer.json"  # the process that writes into the run folder (rank 0), as `process_identity`
WRITER_EXIT_WAIT_S = 30.0  # how long a dead driver's writer may take to notice (it watches the driver)


def record_writer(run: storage.Folder) -> None:
    """Rank 0 says which process writes into the run folder, so that a rerun after its driver died can
    make sure it is gone before taking the run over."""
    try:
        run.fs.pipe_file(run.file(WRITER), json.dumps(process_identity()).encode())
    except Exception as err:  # the next takeover then waits out the heartbeat instead
        say(f"warning: could not record this run's writer in {run.uri}: {type(err).__name__}: {first_line(err)}")


def _read_writer(run: storage.Folder) -> Optional[dict]:
    try:
        return json.loads(run.fs.cat_file(run.file(WRITER)))
    except FileNotFoundError:
        return None
    except ValueError:  # cut off while written: nothing to tell by
        return {}


def _writer_gone(run: storage.Folder) -> bool:
    """True once the run's recorded writer is known to be gone (ended now if it outlived its driver);
    False where it cannot be told (it ran on another machine)."""
    writer = _read_writer(run)
    if writer is None:
        return True
    state = process_state(writer)
    if state == "unknown":
        return False
    deadline = time.monotonic() + WRITER_EXIT_WAIT_S
    while state == "alive" and time.monotonic() < deadline:
        time.sleep(0.1)
        state = process_state(writer)
    if state == "alive":  # an orphan still writing into the run folder: it must not go on
        say(f"stopping pid {writer['pid']}, which still writes into {run.uri} although its driver is gone")
        with contextlib.suppress(ProcessLookupError):
            os.kill(writer["pid"], signal.SIGKILL)
        while process_state(writer) == "alive":
            time.sleep(0.05)
    return True


class RunLease:
    """Held from `acquire()` to `release()`; a daemon thread renews it every `timeout_s / 4`."""

    def __init__(
        self, run: storage.Folder, timeout_s: float, on_lost: Optional[Callable[[str], None]] = None, wait: bool = True
    ):
        self._file: Optional[object] = None
        if storage.is_local(run.fs):
            run.fs.makedirs(run.path, exist_ok=True)
            self._file = _LocalLeaseFile(run.file(LEASE))
        elif storage.scheme_of(run.uri) == "s3":
            self._file = _S3LeaseObject(run.fs, run.file(LEASE))
        else:
            say(
                f"warning: {run.uri}: one writer per run is not enforced on {storage.scheme_of(run.uri)}:// "
                "(no conditional writes implemented for it); do not start this run twice"
            )
        self.run, self.timeout_s, self.on_lost, self.wait = run, timeout_s, on_lost, wait
        self.owner = {"id": uuid.uuid4().hex, **process_identity(), "started": time.time()}
        self._version: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def beat_s(self) -> float:
        return self.timeout_s / 4

    def _record(self) -> dict:
        return {**self.owner, "heartbeat": time.time(), "timeout_s": self.timeout_s}

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming the live owner; a dead one's is taken over, said aloud."""
        if self._file is None:
            return
        held, version = self._file.read()
        announced_wait = False
        while held is not None:
            age = time.time() - float(held.get("heartbeat", 0))
            who = f"pid {held.get('pid')} on {held.get('host')}"
            owner = process_state(held)
            if owner == "gone" and _writer_gone(self.run):
                say(f"taking over {self.run.uri} from {who}, which is no longer running")
                break
            if age >= self.timeout_s:
                say(
                    f"taking over {self.run.uri} from {who}, whose heartbeat stopped {age:.0f} s ago "
                    f"(run.lease_timeout_s={self.timeout_s:g})"
                )
                break
            if owner == "alive" or (owner == "unknown" and age < 1.5 * self.beat_s + 1.0):  # it runs, or beats
                raise LeaseHeld(
                    f"{self.run.uri} is being trained by {who} (heartbeat {age:.0f} s ago); a "
                    "second writer would corrupt it: wait for that run to end, stop it, or use "
                    "another run.name"
                )
            # Its heartbeat stopped (or its driver is gone but its writer ran on another machine): the lease
            # expires run.lease_timeout_s after the last beat.
            left = self.timeout_s - age
            why = "whose writer ran on another machine" if owner == "gone" else "whose heartbeat stopped"
            if not self.wait:
                raise LeaseHeld(
                    f"{self.run.uri} is held by {who}, {why} ({age:.0f} s ago); it can be taken "
                    f"over in {left:.0f} s (run.lease_timeout_s={self.timeout_s:g}): rerun without "
                    "--no-wait to wait for it"
                )
            if not announced_wait:
                say(
                    f"{self.run.uri} is held by {who}, {why} ({age:.0f} s ago): waiting up to {left:.0f} s for "
                    f"its lease to expire (run.lease_timeout_s={self.timeout_s:g}; --no-wait refuses instead)"
                )
                announced_wait = True
            time.sleep(min(1.0, max(left, 0.0)))
            again, again_version = self._file.read()
            if again_version != version and again is not None and again.get("id") == held.get("id"):
                raise LeaseHeld(
                    f"{self.run.uri} is being trained by {who}: its heartbeat came back; a second "
                    "writer would corrupt it: wait for that run to end, stop it, or use another "
                    "run.name"
                )
            held, version = again, again_version
        self._version = self._file.write_if(self._record(), version)
        if self._version is None:
            raise LeaseHeld(f"{self.run.uri}: another run took its lease at the same moment; try again")
        with contextlib.suppress(FileNotFoundError):  # the writer of an earlier run, known to be gone
            self.run.fs.rm(self.run.file(WRITER))
        self._thread = threading.Thread(target=self._beat, name="aevb-run-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        warned: set[str] = set()  # one warning per cause, not one per heartbeat
        while not self._stop.wait(self.beat_s):
            try:
                version = self._file.write_if(self._record(), self._version)
            except Exception as err:  # a storage hiccup: the next beat tries again, well within the timeout
                cause = f"{type(err).__name__}: {first_line(err)}"
                if cause not in warned:
                    warned.add(cause)
                    say(
                        f"warning: could not renew the lease of {self.run.uri}: {cause} (retrying at every "
                        "heartbeat; said once)"
                    )
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
