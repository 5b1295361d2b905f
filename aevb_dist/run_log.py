"""What rank 0 writes into the run folder besides checkpoints: metrics.csv, TensorBoard, the config.

metrics.csv is rewritten whole at each log interval (object stores cannot append), and on
resume it keeps only rows up to the resumed step, so no step is duplicated or missing.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from typing import Optional

from aevb_dist import storage

COLUMNS = ["step", "epoch", "samples_seen", "train_elbo", "test_elbo", "samples_per_s", "skipped_steps", "time"]


def read_metrics(fs, path: str) -> list[dict]:
    if not fs.exists(path):
        return []
    text = fs.cat_file(path).decode()
    return [{k: _number(k, v) for k, v in row.items() if k in COLUMNS} for row in csv.DictReader(io.StringIO(text))]


def _number(key: str, value: Optional[str]):
    if value in ("", None):
        return math.nan
    return int(value) if key in ("step", "epoch", "samples_seen", "skipped_steps") else float(value)


class RunLog:
    def __init__(self, run_uri: str, *, resume_step: int, total_steps: int, endpoint_url: Optional[str] = None):
        self.fs, self.path = storage.resolve(run_uri, endpoint_url)
        self.fs.makedirs(self.path, exist_ok=True)
        self.total_steps = total_steps
        self.rows = [r for r in read_metrics(self.fs, f"{self.path}/metrics.csv") if r["step"] <= resume_step]
        self._local_tb = storage.scheme_of(run_uri) == "file"
        self._tb_dir = f"{self.path}/tensorboard" if self._local_tb else tempfile.mkdtemp(prefix="aevb-tb-")
        self._tb = _summary_writer(self._tb_dir, purge_step=resume_step + 1)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        self.fs.pipe_file(f"{self.path}/metrics.csv", out.getvalue().encode())
        if self._tb is not None:
            for key in ("train_elbo", "test_elbo", "samples_per_s"):
                if not math.isnan(row[key]):
                    self._tb.add_scalar(key, row[key], global_step=row["step"])

    def flush(self) -> None:
        if self._tb is None:
            return
        self._tb.flush()
        if not self._local_tb:
            for name in os.listdir(self._tb_dir):
                self.fs.put_file(os.path.join(self._tb_dir, name), f"{self.path}/tensorboard/{name}")

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()


def progress_line(row: dict, total_steps: int) -> str:
    test = f" | test ELBO {row['test_elbo']:.2f}" if not math.isnan(row["test_elbo"]) else ""
    return (f"step {row['step']}/{total_steps} | epoch {row['epoch']} | {row['samples_seen']:,} samples | "
            f"{row['samples_per_s']:,.0f} samples/s | train ELBO {row['train_elbo']:.2f}{test}")


def _summary_writer(log_dir: str, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.csv always has everything
        return None
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)
