"""Local mode's fork server, started early: this module imports nothing heavy, so the command can start
the server before it imports torch itself and both processes' imports run at once."""

import multiprocessing
import multiprocessing.forkserver

# Imported once in the fork server, not in every worker (and never by the command's own process).
PRELOAD = ["aevb_dist.train.forkserver_preload"]


def prestart() -> None:
    """Start the fork server now, so its imports overlap with the caller's own start-up work."""
    multiprocessing.set_forkserver_preload(PRELOAD)  # no effect once the server runs
    multiprocessing.forkserver.ensure_running()
