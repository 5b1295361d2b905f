"""The run folder's storage goes away mid-run: short outages are waited out, long ones stop the run in one
line, keeping the last verified checkpoint, and the rerun resumes."""

import subprocess
import sys
import threading
import time

import pytest

from aevb_dist.run import checkpoint, storage
from aevb_dist.run.metrics import read_metrics
from tests.faults import SLOW, StorageLink, wait_for
from tests.helpers import SMOKE, aevb, tiny_overrides

pytestmark = pytest.mark.slow  # local-mode workers writing to the S3 server through a relay

OUTAGE_S = 8  # a storage outage that the run waits out (run.storage_retry_s: 300 s)


def outage_run(tiny_data, tmp_path, s3_endpoint, name: str, local_mode: bool = True, **extra):
    link = StorageLink(int(s3_endpoint.rsplit(":", 1)[1]))
    uri = f"s3://aevb-test/outage-{tmp_path.name}"
    args = [
        "train",
        SMOKE,
        *tiny_overrides(tiny_data, uri, **{**SLOW, "train.num_workers": 1, "checkpoint.every_steps": 50, **extra}),
        f"run.name={name}",
        f"run.s3_endpoint_url=http://127.0.0.1:{link.port}",
        f"ray.local_mode={str(local_mode).lower()}",
    ]
    direct = storage.Folder.open(f"{uri}/{name}", s3_endpoint)  # the test's own view, not through the relay
    return link, args, direct


def saved_step(run: storage.Folder) -> int:
    try:
        newest = checkpoint.latest(run.fs, run.path)
    except Exception:
        return 0
    return checkpoint.manifest_step(run.fs, newest) if newest else 0


def start_past_a_checkpoint(args: list[str], run: storage.Folder):
    """`aevb-dist ARGS` started, its stderr collected in `output["err"]` by `reader`, once step 100 is saved."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "aevb_dist", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    output: dict = {}
    reader = threading.Thread(target=lambda: output.update(err=proc.communicate()[1]), daemon=True)
    reader.start()
    wait_for(lambda: saved_step(run) >= 100, timeout=180)
    return proc, output, reader


@pytest.mark.parametrize("local_mode", [True, False], ids=["local-mode", "embedded-ray"])
def test_an_outage_within_the_limit_is_waited_out_and_every_checkpoint_verifies(
    tiny_data, tmp_path, s3_endpoint, local_mode
):
    """Under both launchers: rank 0 writes checkpoints into the run folder itself (on Ray too, where Ray
    Train's own upload inside `report` used to fail the group at the first refused connection). The outage
    outlasts the S3 client's own retries (3 attempts, about a second), so the run folder's retries wait it out."""
    link, args, run = outage_run(tiny_data, tmp_path, s3_endpoint, "short", local_mode=local_mode)
    proc, output, reader = start_past_a_checkpoint(args, run)
    link.cut()
    assert saved_step(run) < 600 and proc.poll() is None  # the outage falls in the middle of the run
    time.sleep(OUTAGE_S)
    link.restore()
    reader.join(timeout=300)
    assert proc.returncode == 0, output.get("err", "")[-3000:]
    if local_mode:  # on Ray the workers' warnings stay in their logs unless ray.show_worker_logs=true
        assert "retrying for up to 300 s" in output["err"]
    names = [p.rsplit("/", 1)[-1] for p in run.fs.ls(run.path) if "checkpoint_" in p]
    assert names and all(checkpoint.verify(run.fs, f"{run.path}/{n}") is None for n in names)
    assert saved_step(run) == 600
    steps = [r["step"] for r in read_metrics(run.fs, run.file("metrics.csv"))]
    assert steps == [1, *range(10, 601, 10)]


def test_an_outage_past_the_limit_stops_in_one_line_and_the_rerun_resumes(tiny_data, tmp_path, s3_endpoint):
    link, args, run = outage_run(
        tiny_data, tmp_path, s3_endpoint, "long", **{"run.storage_retry_s": 4, "run.lease_timeout_s": 4}
    )
    proc, output, reader = start_past_a_checkpoint(args, run)
    link.cut()
    reader.join(timeout=300)
    kept = saved_step(run)
    link.restore()
    assert proc.returncode == 2, output.get("err", "")[-3000:]
    errors = [line for line in output["err"].splitlines() if ": error: " in line]
    assert len(errors) == 1 and "storage unreachable for" in errors[0], output["err"][-3000:]
    assert "Traceback" not in output["err"] and 100 <= kept < 600
    time.sleep(4)  # the stopped run's lease goes stale
    again = aevb(*args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming long from {checkpoint.checkpoint_name(kept)}" in again.stderr
    assert saved_step(run) == 600
