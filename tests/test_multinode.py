"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head of 0 CPUs and worker
nodes of 1 CPU, each its own raylet), data and run folder on the S3 server (nodes of a real cluster share
no disk): a 2-node run, and an elastic run through a preemption notice, a node's return and a node's death."""

import threading
import time

import pytest

from aevb_dist.config import load_config
from aevb_dist.run import storage
from aevb_dist.run.metrics import read_metrics
from aevb_dist.train import stop_request
from aevb_dist.train.driver import train
from tests.helpers import SMOKE, final_state, tiny_overrides

pytestmark = pytest.mark.slow

# A lost node is noticed in ~1.5 s instead of Ray's default ~30 s (RAY_NOTES.md), for the cluster and driver.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    # Ray Train 2.60 counts a node that just died as room for a worker for a moment, tries
    # to start the group on it and gives up after this timeout (60 s by default), then
    # starts smaller; on this loaded machine a group starts within ~10 s.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
}


@pytest.fixture
def cluster(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    for key, value in FAST_HEALTH_CHECKS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    head = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [head.add_node(num_cpus=1) for _ in range(2)]
    head.wait_for_nodes()
    yield head, nodes
    ray.shutdown()  # the driver stays connected to a cluster it joined (ray.address); the cluster goes first
    head.shutdown()


@pytest.fixture
def s3_data(tiny_data, s3_endpoint):
    from aevb_dist.data.prepare import prepare

    uri = "s3://aevb-test/datasets/tiny-multinode"
    fs, path = storage.resolve(uri, s3_endpoint)
    if not fs.exists(path):
        prepare(
            f"{tiny_data}/../x.npy",
            uri,
            num_shards=3,
            rows_per_row_group=16,
            endpoint_url=s3_endpoint,
            report=lambda m: None,
        )
    return uri


def overrides(data: str, endpoint: str, name: str, **extra) -> list[str]:
    return tiny_overrides(
        data,
        "s3://aevb-test/multinode-runs",
        **{
            "run.s3_endpoint_url": endpoint,
            "train.global_batch_size": 24,
            "data.num_partitions": 8,
            "optim.name": "adam",
            "optim.lr": 0.01,
            "train.cpus_per_worker": 1,
            **extra,
        },
    ) + [f"run.name={name}"]


def metrics(name: str, endpoint: str) -> list[dict]:
    fs, path = storage.resolve(f"s3://aevb-test/multinode-runs/{name}", endpoint)
    return read_metrics(fs, f"{path}/metrics.csv")


def test_two_nodes_train_one_worker_each_the_same_model_as_one_worker(cluster, s3_data, s3_endpoint):
    head, _ = cluster
    last = train(
        load_config(
            SMOKE,
            overrides(
                s3_data,
                s3_endpoint,
                "two-nodes",
                **{"train.num_workers": 2, "train.max_steps": 20, "ray.address": head.address},
            ),
        )
    )
    assert last["step"] == 20 and [r["num_workers"] for r in metrics("two-nodes", s3_endpoint)] == [2] * 11
    train(
        load_config(
            SMOKE,
            overrides(
                s3_data,
                s3_endpoint,
                "one-worker",
                **{"train.num_workers": 1, "train.max_steps": 20, "ray.local_mode": "true"},
            ),
        )
    )
    two = final_state("s3://aevb-test/multinode-runs/two-nodes", s3_endpoint)
    one = final_state("s3://aevb-test/multinode-runs/one-worker", s3_endpoint)
    worst = max(
        ((two["model"][k] - one["model"][k]).abs().max() / one["model"][k].abs().max()).item() for k in one["model"]
    )
    assert worst <= 1e-5


def test_an_elastic_run_through_a_preemption_a_return_and_a_node_death_ends_as_one_worker_would(
    cluster, s3_data, s3_endpoint, monkeypatch, capsys
):
    """One elastic run (2 workers, min 1), through what a spot cluster does to it:
    1. a preemption notice on one node (the autoscaler's drain call, `ray drain-node --reason
       DRAIN_NODE_REASON_PREEMPTION`), then the node reclaimed: the workers checkpoint the step after the
       notice (not an interval's), and Ray Train restarts the group with 1 worker from that very step;
    2. a node joins: the group grows back to 2 workers;
    3. a node dies with no notice: the group goes on with 1 worker from the newest checkpoint;
    then a stop request (as Ctrl-C makes). Every step is logged once, each resize is one line, and the
    parameters equal a 1-worker run of the same steps (global batches: the worker count does not matter)."""
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")  # Ray's drain watcher; 5 s by default
    head, nodes = cluster
    name = "elastic"
    cfg = load_config(
        SMOKE,
        overrides(
            s3_data,
            s3_endpoint,
            name,
            **{
                "train.num_workers": 2,
                "train.min_workers": 1,
                "train.max_failures": 5,
                "train.max_steps": 1_000_000,
                "checkpoint.every_steps": 100,
                "train.log_every_steps": 25,
                "train.eval_every_steps": 0,
                "ray.address": head.address,
            },
        ),
    )
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(last=train(cfg)), daemon=True)
    runner.start()

    def wait_for(predicate, what: str, timeout: float = 240) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline and runner.is_alive():
            rows = metrics(name, s3_endpoint)
            if rows and predicate(rows):
                return rows
            time.sleep(0.5)
        raise AssertionError(f"{what}: not seen within {timeout} s (run alive: {runner.is_alive()})")

    wait_for(lambda rows: True, "a first step")  # step 1 is uploaded at once (later rows every 10 s)
    accepted, why_not = _drain_for_preemption(head.address, nodes[1].node_id, deadline_s=10)
    assert accepted, why_not
    # The reclaim (the cloud's doing, not Ray's), before the deadline: a node still up when the group
    # restarts counts as room for 2 workers (see RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S above).
    time.sleep(5)
    head.remove_node(nodes[1], allow_graceful=False)
    shrunk = wait_for(lambda rows: rows[-1]["num_workers"] == 1, "training on with 1 worker after the notice")
    joined = head.add_node(num_cpus=1)
    grown = wait_for(
        lambda rows: rows[-1]["num_workers"] == 2 and rows[-1]["step"] > shrunk[-1]["step"], "growing back to 2 workers"
    )
    wait_for(lambda rows: rows[-1]["step"] >= grown[-1]["step"] + 50, "training with 2 workers again")
    head.remove_node(joined, allow_graceful=False)  # a node dies, no notice
    wait_for(
        lambda rows: rows[-1]["num_workers"] == 1 and rows[-1]["step"] > grown[-1]["step"],
        "training on with 1 worker after the node died",
    )
    stop_request.request(storage.run_folder(cfg.run), "test")
    runner.join(timeout=120)
    assert not runner.is_alive() and "last" in result
    end = result["last"]["step"]

    rows = metrics(name, s3_endpoint)
    steps, workers = [r["step"] for r in rows], [r["num_workers"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == end  # every step once, to the stop
    changes = [
        (workers[i - 1], workers[i], steps[i - 1], steps[i])
        for i in range(1, len(rows))
        if workers[i] != workers[i - 1]
    ]
    assert [(a, b) for a, b, _, _ in changes] == [(2, 1), (1, 2), (2, 1)], changes
    _, _, noticed, resumed = changes[0]
    assert noticed % 25 != 0 and resumed <= noticed + 25  # checkpointed for the notice; went on from there
    err = capsys.readouterr().err  # each resize is one line
    assert err.count("resized: 2 → 1 workers at step") == 2 and err.count("resized: 1 → 2 workers at step") == 1
    assert f"stopped at step {end}" in err
    train(
        load_config(
            SMOKE,
            overrides(
                s3_data,
                s3_endpoint,
                "one-worker-elastic",
                **{"train.num_workers": 1, "train.max_steps": end, "ray.local_mode": "true"},
            ),
        )
    )
    resized = final_state(f"s3://aevb-test/multinode-runs/{name}", s3_endpoint)
    one = final_state("s3://aevb-test/multinode-runs/one-worker-elastic", s3_endpoint)
    assert resized["state"]["step"] == one["state"]["step"] == end
    worst = max(
        ((resized["model"][k] - one["model"][k]).abs().max() / one["model"][k].abs().max()).item() for k in one["model"]
    )
    # fp32 sums in another order differ by ~1e-7 a step and the differences add up like a random walk. This run's
    # length is set by wall time (a stop request), so the bound grows with √steps from 1e-5 at 1,000 steps; a
    # wrong example, order or noise differs by ~1e-2.
    assert worst <= 1e-5 * max(1.0, end / 1000) ** 0.5, (worst, end)


def _drain_for_preemption(address: str, node_id: str, deadline_s: int) -> tuple[bool, str]:
    """What `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N` does (the
    autoscaler's call for a spot reclaim), in this process: the command takes seconds to start on 2 cores."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=address)
    deadline_ms = time.time_ns() // 1_000_000 + deadline_s * 1000
    return gcs.drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "spot reclaim (test)",
        deadline_ms,
    )
