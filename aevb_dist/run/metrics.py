"""What rank 0 writes into the run folder besides checkpoints: metrics.csv, TensorBoard, the config.

On resume metrics.csv keeps only rows up to the resumed step, so no step is duplicated or
missing. After that, a row costs O(1): on a local filesystem each row is appended; object
stores cannot append, so the whole file (kept in memory as text, each row formatted once) is
uploaded at most every `upload_interval_s` and at every checkpoint and at the end. Rewriting
the file at every log took 236 ms per row at 100,000 rows (benchmarks/run_log.py), more than
the training steps between two logs of a long run.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import sys
import threading
import time
from typing import Optional

from aevb_dist.console import say, unfixable_by_waiting
from aevb_dist.run import scratch, storage

COLUMNS = [
    "step",
    "epoch",
    "samples_seen",
    "train_elbo",
    "test_elbo",
    "samples_per_s",
    "skipped_steps",
    "time",
    "num_workers",
    # What was optimized, where it is not the bound itself (KL warm-up, free bits); blank otherwise.
    "train_objective",
    # The optimizer's learning rate at the row's step (optim.lr_schedule).
    "learning_rate",
]


def read_metrics(fs, path: str) -> list[dict]:
    if not fs.exists(path):
        return []
    text = fs.cat_file(path).decode()
    return [{k: _number(k, v) for k, v in row.items() if k in COLUMNS} for row in csv.DictReader(io.StringIO(text))]


def _number(key: str, value: Optional[str]):
    if value in ("", None):
        return math.nan
    if key in ("step", "epoch", "samples_seen", "skipped_steps", "num_workers"):
        try:
            return int(value)
        except ValueError:  # "nan": a column that rows written before it existed lack (num_workers)
            return float(value)
    return float(value)


def _csv_text(rows: list[dict], header: bool = False) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class RunLog:
    def __init__(
        self,
        run: storage.Folder,
        *,
        resume_step: int,
        upload_interval_s: float = 10.0,
        retry_s: float = 300.0,
    ):
        self.fs, self.path, self.uri = run.fs, run.path, run.uri
        self.fs.makedirs(self.path, exist_ok=True)
        self.metrics_path = f"{self.path}/metrics.csv"
        kept = [r for r in read_metrics(self.fs, self.metrics_path) if r["step"] <= resume_step]
        self._text = io.StringIO()
        self._text.write(_csv_text(kept, header=True))  # (a StringIO given its text would write over it)
        self._on_local_disk = storage.is_local(self.fs)  # append in place; else upload the whole file
        self.upload_interval_s, self._uploaded_at, self.retry_s = upload_interval_s, 0.0, retry_s
        self._upload()  # once whole: drops the rows after the resumed step
        self._uploaded_at = -math.inf  # the launch's first row goes up at once: the driver sees training begin
        self._tb_dir = f"{self.path}/tensorboard" if self._on_local_disk else scratch.make("tb")
        self._tb = _summary_writer(self._tb_dir, purge_step=resume_step + 1)

    def _local_write(self, what: str, num_bytes: Optional[int] = None):
        """A write on local disk; a full or read-only disk is one line naming the run folder."""
        return storage.unwritable_told(self.uri, what, needed_bytes=num_bytes)

    def _upload(self) -> None:
        data = self._text.getvalue().encode()
        if self._on_local_disk:  # a new file renamed over the old: a reader sees one or the other
            with self._local_write("metrics.csv", len(data)):
                with open(f"{self.metrics_path}.tmp", "wb") as f:
                    f.write(data)
                os.replace(f"{self.metrics_path}.tmp", self.metrics_path)
        else:  # an outage is waited out (storage.with_retries)
            storage.with_retries(
                lambda: self.fs.pipe_file(self.metrics_path, data), "writing metrics.csv", self.retry_s
            )
        self._uploaded_at = time.monotonic()

    def append(self, row: dict) -> None:
        line = _csv_text([row])
        self._text.write(line)
        if self._on_local_disk:
            with self._local_write("metrics.csv", len(line)), open(self.metrics_path, "a") as f:
                f.write(line)
        elif time.monotonic() - self._uploaded_at >= self.upload_interval_s:
            self._upload()
        if self._tb is not None:
            with self._local_write("TensorBoard events"):
                for key in ("train_elbo", "test_elbo", "samples_per_s", "train_objective"):
                    value = row.get(key, math.nan)
                    if not math.isnan(value):
                        self._tb.add_scalar(key, value, global_step=row["step"])

    def flush(self) -> None:
        if not self._on_local_disk:
            self._upload()
        if self._tb is None:
            return
        with self._local_write("TensorBoard events"):
            self._tb.flush()
        if not self._on_local_disk:
            for name in os.listdir(self._tb_dir):
                storage.with_retries(
                    lambda name=name: self.fs.put_file(
                        os.path.join(self._tb_dir, name), f"{self.path}/tensorboard/{name}"
                    ),
                    "writing TensorBoard events",
                    self.retry_s,
                )

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            with self._local_write("TensorBoard events"):
                self._tb.close()
            if not self._on_local_disk:  # its events are in the run folder now
                shutil.rmtree(self._tb_dir, ignore_errors=True)


class MetricsTail:
    """The rows added to a metrics.csv since the last call: only the new bytes of a local file are read;
    a remote one is read whole. A file replaced by RunLog (on resume) is read again from the start."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self._local = storage.is_local(fs)
        self._inode, self._offset, self._header, self._partial = None, 0, None, ""

    def new_rows(self) -> list[dict]:
        if not self._local:
            return read_metrics(self.fs, self.path)
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self._inode:
                    self._inode, self._offset, self._header, self._partial = inode, 0, None, ""
                f.seek(self._offset)
                chunk = f.read().decode()
                self._offset = f.tell()
        except FileNotFoundError:
            return []
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next call
        if self._header is None and lines:
            self._header = next(csv.reader([lines.pop(0)]))
        return [
            {k: _number(k, v) for k, v in zip(self._header, values) if k in COLUMNS}
            for values in csv.reader(lines)
            if values
        ]


def progress_line(row: dict, total_steps: int) -> str:
    test = f" | test ELBO {row['test_elbo']:.2f}" if not math.isnan(row["test_elbo"]) else ""
    return (
        f"step {row['step']}/{total_steps} | epoch {row['epoch']} | {row['samples_seen']:,} samples | "
        f"{row['samples_per_s']:,.0f} samples/s | train ELBO {row['train_elbo']:.2f}{test}"
    )


def _summary_writer(log_dir: str, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.csv always has everything
        return None
    _quiet_full_disk_in_threads()
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)


def _quiet_full_disk_in_threads() -> None:
    """TensorBoard's writer thread dies with a traceback on a full disk; the training thread then gets the
    same error at its next write (`_local_write`: one line naming the run folder). The thread stays quiet."""
    before = threading.excepthook
    if getattr(before, "aevb_quiet_full_disk", False):
        return

    def hook(args) -> None:
        if not unfixable_by_waiting(args.exc_value):
            before(args)

    hook.aevb_quiet_full_disk = True
    threading.excepthook = hook


class ProgressPrinter:
    """Prints new metrics.csv rows while the run goes; the workers' own logs stay in Ray's log files."""

    def __init__(self, run: storage.Folder, total_steps: int, start_step: int, interval_s: float = 1.0):
        self.tail, self.total_steps, self.interval_s = (
            MetricsTail(run.fs, run.file("metrics.csv")),
            total_steps,
            interval_s,
        )
        seen = self._rows()  # what is there already (rows past `start_step` are trained again, and printed then)
        self.start_step = self.last_step = start_step
        self.workers, self.workers_step = None, 0  # the worker count, as of which step
        for row in seen:
            if row["step"] <= start_step:
                self._note_resize(row, quiet=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._polling = threading.Lock()  # the loop's thread and `trained_past_start_now`'s read in turn

    def _rows(self) -> list[dict]:
        try:
            return self.tail.new_rows()
        except Exception:  # a half-written file or a transient storage error: try again next tick
            return []

    def poll(self) -> None:
        with self._polling:
            for row in self._rows():
                self._note_resize(row)
                if row["step"] > self.last_step:
                    print(progress_line(row, self.total_steps), file=sys.stderr, flush=True)
                    self.last_step = row["step"]

    @property
    def trained_past_start(self) -> bool:
        """Whether this launch has logged a step yet (rank 0 logs its first step at once: RunLog), as of the
        newest poll, at most `interval_s` ago."""
        return self.last_step > self.start_step

    def trained_past_start_now(self, timeout_s: float = 2.0) -> bool:
        """`trained_past_start`, read afresh from metrics.csv where the last poll saw no step yet (steps may have
        come since). A read that takes longer than `timeout_s` (storage that does not answer) counts as trained:
        the caller then asks the workers to stop at a step rather than stopping at once."""
        if self.trained_past_start:
            return True
        reading = threading.Thread(target=self.poll, name="aevb-progress-now", daemon=True)
        reading.start()
        reading.join(timeout_s)
        return reading.is_alive() or self.trained_past_start

    def _note_resize(self, row: dict, quiet: bool = False) -> None:
        """An elastic run's worker count changed (metrics.csv's num_workers): one line. Rows re-read from
        before the last change (the file is read whole again on object stores) are not news."""
        workers = row.get("num_workers")
        if workers is None or workers != workers or row["step"] < self.workers_step:  # absent, NaN (older runs)
            return
        if self.workers is not None and workers != self.workers and not quiet:
            say(f"resized: {self.workers} → {workers} workers at step {row['step']}")
        self.workers, self.workers_step = workers, row["step"]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
