"""The shape of the code, checked: layers import downward only, no import circle, the worker is blind
to its launcher and handed its context, small modules and functions, and one import path for each thing."""

import ast
import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "aevb_dist")

# Lower numbers are lower layers. A module may import its own package's modules, the foundation's
# modules among themselves, and anything in a lower layer; never a higher layer or a sibling package.
LAYERS = {
    "names": 0,
    "console": 0,
    "seeds": 0,
    "config": 0,  # the schema, its checks, load_config, the generated reference
    "run": 0,  # the run folder: storage and URIs, checkpoints, metrics.csv, the lease
    "cluster": 0,  # Ray started or joined, jobs submitted, Ray's private details
    "model": 1,
    "data": 1,
    "eval": 3,
    "tracking": 4,  # above eval: a run's learning curve goes to MLflow as it is drawn for `plot`
    "train": 5,  # above eval: training's test-set ELBO is eval's, computed one way
    "sweep": 6,  # a sweep's trial is a training run
    "cli": 7,
    "__main__": 8,
}
FOUNDATION = 0


def modules() -> dict[str, str]:
    """Every module of the package by dotted name, with its file."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), REPO)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return found


def imports_of(path: str) -> set[str]:
    """The aevb_dist modules a file imports, at the top or inside functions (lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("aevb_dist")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aevb_dist"):
            known = modules()
            for alias in node.names:  # `from aevb_dist.run import storage` imports the module aevb_dist.run.storage
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out - {"aevb_dist"}


def unit(module: str) -> str:
    """The layered unit a module belongs to: its subpackage, or the top-level module itself."""
    return module.split(".")[1] if module.count(".") >= 1 else module


def test_every_module_has_a_layer():
    assert {unit(m) for m in modules() if m != "aevb_dist"} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(m for m in modules() if m != "aevb_dist"))
def test_layers_import_downward_only(module):
    mine = unit(module)
    for target in imports_of(modules()[module]):
        theirs = unit(target)
        if theirs == mine or (LAYERS[mine] == LAYERS[theirs] == FOUNDATION):
            continue
        assert LAYERS[theirs] < LAYERS[mine], (
            f"{module} (layer {LAYERS[mine]}) imports {target} (layer {LAYERS[theirs]})"
        )


def test_no_import_circle():
    graph = {m: imports_of(path) & set(modules()) for m, path in modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import circle: " + " → ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_worker_is_blind_to_its_launcher():
    source = open(os.path.join(PACKAGE, "train", "worker.py")).read()
    assert "local_mode" not in source and "launcher" not in imports_of(os.path.join(PACKAGE, "train", "worker.py"))
    assert not {m for m in imports_of(os.path.join(PACKAGE, "train", "worker.py")) if "launcher" in m}
    # It is handed its rank, world size and device (WorkerContext): it never asks Ray Train who it is.
    assert "import ray" not in source and "get_context" not in source


def test_modules_and_functions_stay_small():
    """In lines as ruff formats them (a call whose arguments do not fit is one line per argument), with
    argparse's table (`build_parser`) aside: modules of at most 420 lines, functions of at most 80."""
    too_long = []
    for module, path in modules().items():
        lines = open(path).read().splitlines()
        table = 0
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if node.name == "build_parser":
                    table = length
                elif length > 80:
                    too_long.append(f"{module}.{node.name}: {length} lines")
        if len(lines) - table > 420:
            too_long.append(f"{module}: {len(lines) - table} lines")
    assert not too_long, too_long


def test_math_and_data_layers_stay_at_their_edges():
    """The model layer imports only torch; the data layer never torch; neither imports Ray."""
    code = (
        "import sys; import aevb_dist.model.vae, aevb_dist.model.elbo, aevb_dist.model.marginal_likelihood, "
        "aevb_dist.model.distributions, aevb_dist.model.networks, aevb_dist.model.posteriors, "
        "aevb_dist.model.hmc, aevb_dist.model.gradient_variance; "
        "bad = [m for m in ('ray', 'pyarrow', 'fsspec', 'omegaconf') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code = (
        "import sys; import aevb_dist.data.reader, aevb_dist.data.prepare, aevb_dist.data.binarization; "
        "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_config_error_needs_no_torch():
    code = (
        "import sys\nfrom aevb_dist.config import load_config\ntry:\n    load_config(None, ['model.activation=x'])\n"
        "except ValueError:\n    pass\nassert 'torch' not in sys.modules and 'fsspec' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "old",
    [
        "aevb_dist.vae",
        "aevb_dist.elbo",
        "aevb_dist.marginal_likelihood",
        "aevb_dist.ray_launcher",
        *(f"aevb_dist.{m}" for m in ("storage", "uri", "checkpoint", "run_log", "run_lease", "compat")),
        *(f"aevb_dist.{m}" for m in ("ray_runtime", "submit", "quickstart", "config_checks", "config_docs")),
    ],
)
def test_one_import_path_for_each_thing(old):
    """No re-exporting shim keeps a second path alive (the model's are under aevb_dist.model, `train` is
    aevb_dist.train.driver.train)."""
    assert importlib.util.find_spec(old) is None
