"""Where rank 0's checkpoints go: straight into the run folder, in the background, retried.

Both launchers use this sink; the worker resumes from the newest verified checkpoint in the run
folder either way, so no launcher needs its own list of checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from typing import Optional

from aevb_dist.console import unfixable_by_waiting
from aevb_dist.run import checkpoint, scratch, storage


class WriteToRunFolder:
    """The checkpoint sink under both launchers: rank 0's folder goes into the run folder, manifest last,
    and old checkpoints are pruned. (On Ray, Ray Train would upload them itself inside `report`, once, so an
    outage failed the whole group.)

    The upload runs in a background thread on a copy of the folder, so training goes on while the
    checkpoint travels (and while a storage outage is waited out, up to `retry_s`); the next checkpoint
    and the end of the run (`wait`) wait for it, and raise its failure."""

    def __init__(self, run: storage.Folder, keep_last: int, retry_s: float):
        self.run, self.keep_last, self.retry_s = run, keep_last, retry_s
        self._upload: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def __call__(self, folder: Optional[str], name: str, metrics: dict) -> None:
        if folder is None:
            return
        self.wait()
        staging = scratch.make("upload")
        shutil.copytree(folder, os.path.join(staging, name))
        self._upload = threading.Thread(target=self._write, args=(staging, name), name="aevb-upload", daemon=True)
        self._upload.start()

    def _write(self, staging: str, name: str) -> None:
        try:
            storage.with_retries(
                lambda: checkpoint.upload(os.path.join(staging, name), self.run.fs, self.run.file(name)),
                f"writing {name}",
                self.retry_s,
            )
            storage.with_retries(
                lambda: checkpoint.prune(self.run.fs, self.run.path, self.keep_last),
                "pruning old checkpoints",
                self.retry_s,
            )
        except OSError as err:  # raised in the training thread, by the next call or `wait`
            self._error = err
            if unfixable_by_waiting(err):
                # A full disk: a cut-off checkpoint gives its room back (never a complete one: the failure
                # may have come from pruning the old ones after this one was written whole).
                with contextlib.suppress(Exception):
                    if checkpoint.verify(self.run.fs, self.run.file(name)) is not None:
                        self.run.fs.rm(self.run.file(name), recursive=True)
                self._error = storage.unwritable_error(
                    err, self.run.uri, name, needed_bytes=_folder_bytes(os.path.join(staging, name))
                )
        except BaseException as err:
            self._error = err
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def wait(self) -> None:
        """Until the last checkpoint is in the run folder; its upload's failure is raised here."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _folder_bytes(folder: str) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file())


class WriteThenReport(WriteToRunFolder):
    """The sink on Ray: the checkpoint is written by `WriteToRunFolder`, and every rank reports the metrics
    (not the checkpoint) to Ray Train, whose `report` is the barrier that keeps the ranks in step."""

    def __call__(self, folder: Optional[str], name: str, metrics: dict) -> None:
        import ray.train

        super().__call__(folder, name, metrics)
        ray.train.report(metrics)
