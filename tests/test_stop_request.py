"""The driver's Ctrl-C and SIGTERM handler (train/stop_request.py), in a process of its own."""

import subprocess
import sys

# The command's handler is installed; a child it starts runs Python between fork and exec (as Ray's processes do:
# their preexec_fn blocks SIGINT) and gets the terminal's Ctrl-C there, as the whole process group does.
CHILD_GETS_CTRL_C_BEFORE_ITS_EXEC = """
import os, signal, subprocess, sys
from aevb_dist.run import storage
from aevb_dist.train.stop_request import stop_on_signals

def preexec():
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(10000):  # the handler runs here, at a bytecode boundary, in the child
        pass

with stop_on_signals(storage.Folder.open(sys.argv[1]), training_began=lambda: False) as seen:
    child = subprocess.Popen([sys.executable, "-c", "pass"], preexec_fn=preexec)
    print("child exit", child.wait(), "seen", seen.signum, flush=True)
"""


def test_a_child_forked_by_the_command_leaves_ctrl_c_to_the_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_GETS_CTRL_C_BEFORE_ITS_EXEC, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # The child neither spoke for the command nor failed its start (Popen's "Exception occurred in preexec_fn")
    assert proc.returncode == 0 and proc.stdout.strip() == "child exit 0 seen None", proc.stderr[-3000:]
    assert "stopping" not in proc.stderr, proc.stderr
