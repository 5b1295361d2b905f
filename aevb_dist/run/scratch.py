"""Scratch folders in this machine's temp folder (TMPDIR): a checkpoint on its way to the run folder, TensorBoard's
events before their upload, `prepare`'s shards before theirs. Each is removed when its work is done; one left by a
process that was killed (a worker Ray killed mid-checkpoint, a `prepare` the kernel killed out of memory) would
stay for good, a checkpoint's size at a time, so the next process that makes one of the same kind removes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

# A leftover is removed only once this old: where TMPDIR is shared with another PID namespace (containers), a
# live process there looks gone from here, and its folder must outlive any upload it may still be making.
ORPHAN_AGE_S = 6 * 3600.0


def make(kind: str) -> str:
    """A new folder `aevb-KIND-PID-…` in TMPDIR, after removing those of the same kind whose process is gone."""
    temp = tempfile.gettempdir()
    remove_orphans(temp, kind)
    return tempfile.mkdtemp(prefix=f"aevb-{kind}-{os.getpid()}-", dir=temp)


@contextlib.contextmanager
def folder(kind: str) -> Iterator[str]:
    """`make(kind)`, removed at the end of the block."""
    path = make(kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_orphans(temp: str, kind: str) -> list[str]:
    """Remove `temp`'s folders of this kind whose process is gone and that are older than ORPHAN_AGE_S; their names."""
    prefix, removed = f"aevb-{kind}-", []
    try:
        names = os.listdir(temp)
    except OSError:
        return removed
    for name in names:
        pid = name[len(prefix) :].split("-", 1)[0] if name.startswith(prefix) else ""
        if not pid.isdigit() or _running(int(pid)):
            continue
        path = os.path.join(temp, name)
        with contextlib.suppress(OSError):
            if time.time() - os.stat(path).st_mtime > ORPHAN_AGE_S:
                shutil.rmtree(path)
                removed.append(name)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
