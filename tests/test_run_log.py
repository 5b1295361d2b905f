"""metrics.csv: rows appended in place on local disk, uploaded whole (throttled) to object stores,
truncated to the resumed step, and read back incrementally by the driver's progress printer."""

import math

from aevb_dist.run import storage
from aevb_dist.run.metrics import MetricsTail, RunLog, read_metrics


def row(step: int) -> dict:
    return {
        "step": step,
        "epoch": 0,
        "samples_seen": 100 * step,
        "train_elbo": -100.0 - step,
        "test_elbo": -99.0 if step % 2 == 0 else math.nan,
        "samples_per_s": 1e4,
        "skipped_steps": 0,
        "time": 1.7e9 + step,
    }


def steps(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows]


def test_local_rows_are_appended_and_tailed_incrementally(tmp_path):
    log = RunLog(storage.Folder.open(str(tmp_path / "run")), resume_step=0)
    fs, path = storage.resolve(str(tmp_path / "run" / "metrics.csv"))
    tail = MetricsTail(fs, path)
    assert tail.new_rows() == []  # a header only
    for s in (1, 2, 3):
        log.append(row(s))
    got = tail.new_rows()
    assert steps(got) == [1, 2, 3] and got[1]["test_elbo"] == -99.0 and math.isnan(got[0]["test_elbo"])
    assert tail.new_rows() == []
    with open(path, "a") as f:  # a row caught half written is held back until its line ends
        f.write("4,0,400,-104.0,")
    assert tail.new_rows() == []
    with open(path, "a") as f:
        f.write(",10000.0,0,1700000004.0\n")
    assert steps(tail.new_rows()) == [4]
    log.close()
    # Resuming from step 2 replaces the file with rows 1..2; the tail starts over and sees the new rows.
    log = RunLog(storage.Folder.open(str(tmp_path / "run")), resume_step=2)
    log.append(row(3))
    assert steps(read_metrics(fs, path)) == [1, 2, 3]
    assert steps(tail.new_rows()) == [1, 2, 3]
    log.close()


def test_object_store_rows_are_uploaded_whole_at_most_every_interval_and_at_flush_the_first_at_once():
    uri = "memory://aevb-run-log-test/run"
    fs, path = storage.resolve(uri)
    log = RunLog(storage.Folder.open(uri), resume_step=0, upload_interval_s=3600)
    log.append(row(1))  # the first row goes up at once: the driver sees training begin (stop_request)
    assert steps(read_metrics(fs, f"{path}/metrics.csv")) == [1]
    log.append(row(2))
    assert steps(read_metrics(fs, f"{path}/metrics.csv")) == [1]  # not yet uploaded
    log.flush()  # at every checkpoint
    assert steps(read_metrics(fs, f"{path}/metrics.csv")) == [1, 2]
    assert steps(MetricsTail(fs, f"{path}/metrics.csv").new_rows()) == [1, 2]
    log.upload_interval_s = 0
    log.append(row(3))
    assert steps(read_metrics(fs, f"{path}/metrics.csv")) == [1, 2, 3]
    log.close()
    fs.rm(path, recursive=True)
