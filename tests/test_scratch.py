"""Scratch folders that a killed process left in TMPDIR are removed by the next process making one of their kind."""

import os
import signal
import subprocess
import sys
import tempfile
import time

from aevb_dist.run import scratch

KILLED_MID_CHECKPOINT = """
import os, signal
from aevb_dist.run import scratch
path = scratch.make("ckpt")
open(os.path.join(path, "state.pt"), "wb").write(b"x" * 1000)
print(path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _left_by_a_killed_process(temp) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_MID_CHECKPOINT],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(temp)},
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc.stdout.strip()


def test_a_killed_processs_old_folder_is_removed_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old_orphan, new_orphan = _left_by_a_killed_process(tmp_path), _left_by_a_killed_process(tmp_path)
    mine = tempfile.mkdtemp(prefix=f"aevb-ckpt-{os.getpid()}-")  # a running process's (this one)
    other_kind = tempfile.mkdtemp(prefix="aevb-tb-1-")
    not_ours = tempfile.mkdtemp(prefix="aevb-ckpt-")  # no pid in its name
    long_ago = time.time() - scratch.ORPHAN_AGE_S - 60
    for path in (old_orphan, mine, other_kind, not_ours):
        os.utime(path, (long_ago, long_ago))
    assert os.path.dirname(old_orphan) == str(tmp_path) and os.path.exists(os.path.join(old_orphan, "state.pt"))

    made = scratch.make("ckpt")

    assert not os.path.exists(old_orphan)
    assert all(os.path.isdir(p) for p in (new_orphan, mine, other_kind, not_ours, made))
    assert os.path.basename(made).startswith(f"aevb-ckpt-{os.getpid()}-")
    with scratch.folder("ckpt") as inside:
        assert os.path.isdir(inside)
    assert not os.path.exists(inside)
