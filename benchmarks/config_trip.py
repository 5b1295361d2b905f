"""How often following a config from `aevb-dist train` to the first training step re-enters a module it left.

Not a speed benchmark: a measure of how the code reads. It runs `aevb-dist train configs/smoke.yaml` on a
small dataset it makes, with the one worker called in this process (as a launcher would in its own), and
records each call into an aevb_dist module from another module, up to the first gradient computation. The
driver's part (up to the launcher) and the worker's part (from `run_worker`) are counted apart, as the
processes they run in; small helpers every layer calls (URIs, storage paths, console lines, names, seeds, the
Parquet index and cache) are left out with --skip, as a reader skims them, and so is code no one reads (a
dataclass's generated __init__). `--follow` counts only the calls handed the config or one of its sections
(as an argument, or as `self.cfg`): the config's own path.

An older tree is measured by copying this file into its benchmarks/ and running it there: the harness
calls that tree's launcher and worker as they were (the worker asked Ray Train who it is, the launcher
built the worker's spec).

    python benchmarks/config_trip.py [--list] [--follow] [--skip a,b]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HELPERS = "uri,console,names,seeds,storage,compat,schema,index,decoded_cache"


class FirstStep(Exception):
    pass


def source_file(frame) -> bool:
    return frame.f_code.co_filename.endswith(".py")


def holds_config(frame) -> bool:
    """Whether the call was handed the run's config or one of its sections (by argument, or as `self.cfg`)."""
    code = frame.f_code
    names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    values = [frame.f_locals.get(n) for n in names]
    if names and names[0] == "self":
        values.append(getattr(values[0], "cfg", None))
    return any(type(v).__module__ == "aevb_dist.config" for v in values)


def trace(data: str, skip: set[str], follow: bool = False) -> dict[str, list[tuple[str, str]]]:
    from aevb_dist.cli.main import main
    from aevb_dist.train import driver, worker

    parts: dict[str, list[tuple[str, str]]] = {"driver": [], "worker": []}
    current = parts["driver"]

    def in_process(*launched):
        nonlocal current
        if isinstance(launched[0], worker.WorkerSpec):  # (spec, num_examples), the driver's
            spec = dataclasses.replace(launched[0], threads=1)
        else:  # an older tree's (cfg, run, train_data[, data_mean]): the launcher built the spec
            cfg, run, train_data, *data_mean = launched
            spec = worker.WorkerSpec(cfg, run, 1, train_data.describe(), *data_mean)
        current = parts["worker"]
        if hasattr(worker, "WorkerContext"):
            worker.run_worker(spec, lambda *a: None, worker.WorkerContext(0, 1, "cpu"))
        else:  # an older tree, whose worker asked Ray Train who it is
            import ray.train

            context = dict(get_world_rank=lambda _: 0, get_world_size=lambda _: 1)
            ray.train.get_context = lambda: type("Context", (), context)()
            worker.run_worker(spec, lambda *a: None)

    driver.launch_local = in_process

    def profile(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        # Code no one reads (a dataclass's generated __init__, a lambda, a generator expression) is no stop.
        if not module.startswith("aevb_dist") or frame.f_code.co_name.startswith("<") or not source_file(frame):
            return
        if frame.f_code.co_name == "accumulate_gradients":
            raise FirstStep
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if caller != module and module.rsplit(".", 1)[-1] not in skip and (not follow or holds_config(frame)):
            current.append((module, frame.f_code.co_name))

    args = ["train", "configs/smoke.yaml", f"data.train_uri={data}/train", f"data.test_uri={data}/test"]
    args += ["model.input_dim=16", "ray.local_mode=true", f"run.storage_uri={tempfile.mkdtemp()}"]
    sys.setprofile(profile)
    try:
        main(args)
    except FirstStep:
        pass
    finally:
        sys.setprofile(None)
    return parts


def stops_and_returns(calls: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
    """Consecutive calls into one module are one stop; a return is a stop in a module left earlier."""
    stops: list[tuple[str, str]] = []
    for module, function in calls:
        if not stops or stops[-1][0] != module:
            stops.append((module, function))
    left, returns = set(), 0
    for i, (module, _) in enumerate(stops):
        returns += module in left
        if i:
            left.add(stops[i - 1][0])
    return stops, returns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default=HELPERS, help=f"modules left out (default {HELPERS}); '' for none")
    parser.add_argument("--follow", action="store_true", help="count only calls handed the config or a section")
    parser.add_argument("--list", action="store_true", help="print every stop")
    args = parser.parse_args()
    from aevb_dist.data.prepare import prepare

    folder = tempfile.mkdtemp()
    x = np.random.default_rng(0).random((300, 16)).astype(np.float32)
    np.save(f"{folder}/x.npy", x)
    prepare(f"{folder}/x.npy", f"{folder}/pq", num_shards=3, rows_per_row_group=16, report=lambda m: None)
    for part, calls in trace(f"{folder}/pq", set(filter(None, args.skip.split(","))), args.follow).items():
        stops, returns = stops_and_returns(calls)
        print(f"{part}: {len(stops)} stops in {len({m for m, _ in stops})} modules, {returns} returns to a module left")
        if args.list:
            print("\n".join(f"    {m}.{f}" for m, f in stops))


if __name__ == "__main__":
    main()
