"""The README's first command, run exactly as written, produces a trained model, metrics and PNGs."""

import csv
import os
import re
import shutil
import subprocess

import pytest

from tests.helpers import REPO


def readme_commands() -> list[str]:
    text = open(os.path.join(REPO, "README.md")).read()
    setup = text.split("## Set up", 1)[1]
    return re.findall(r"```bash\n(.+?)\n```", setup, flags=re.S)[:2]


def test_readme_opens_with_install_and_test_commands():
    install, test = readme_commands()
    assert install.startswith('pip install -e ".[dev]"') and "aevb-dist" in install
    assert test.strip() == "pytest"
    assert open(os.path.join(REPO, ".ci", "run")).read().strip().endswith("\npytest")


def test_readme_python_examples_run_as_written(monkeypatch):
    """The Configuration and Python API examples, in order, as a user pastes them (from the checkout)."""
    text = open(os.path.join(REPO, "README.md")).read()
    blocks = re.findall(
        r"```python\n(.+?)\n```", text.split("## Configuration", 1)[1].split("## Architecture")[0], flags=re.S
    )
    assert len(blocks) == 2
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["log_px"].shape == (10,) and namespace["cfg"].train.num_workers == 2


@pytest.mark.slow  # installs the package and runs the quickstart on an embedded Ray
def test_readme_quickstart_command_as_written():
    install, _ = readme_commands()
    out = os.path.join(REPO, "aevb-quickstart")
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        proc = subprocess.run(["bash", "-c", install], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "samples/s" in proc.stderr and "aevb-dist quickstart finished" in proc.stdout
        # It ends with its summary and the next commands: no raw JSON line, no notice of Ray's to act on.
        assert proc.stdout.rstrip().splitlines()[-1].lstrip().startswith("on a cluster:"), proc.stdout[-500:]
        assert "Token authentication is enabled" not in proc.stderr + proc.stdout
        run = os.path.join(out, "runs", "quickstart_digits")
        for name in (
            "metrics.csv",
            "config.yaml",
            "eval_test.json",
            "plots/learning_curve.png",
            "plots/samples.png",
            "plots/manifold.png",
        ):
            assert os.path.getsize(os.path.join(run, name)) > 0, name
        assert any(n.startswith("checkpoint_") for n in os.listdir(run))
        rows = list(csv.DictReader(open(os.path.join(run, "metrics.csv"))))
        assert float(rows[-1]["train_elbo"]) > float(rows[0]["train_elbo"]) + 5  # the ELBO improved
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("document", ["RELIABILITY.md", "docs/models.md", "docs/gpus.md", "docs/training.md"])
def test_every_test_a_document_cites_exists(document):
    """A promise names the test that holds it: each cited file exists and defines each cited test."""
    text = open(os.path.join(REPO, document)).read()
    cited = re.findall(r"`(tests/test_\w+\.py)((?:::\w+)?)(?:\[[^\]]*\])?((?:, test_\w+)*)`", text)
    assert cited or document != "RELIABILITY.md"
    for path, name, more in cited:
        assert os.path.exists(os.path.join(REPO, path)), f"{document} cites {path}, which does not exist"
        source = open(os.path.join(REPO, path)).read()
        for test in [name.lstrip(":")] + re.findall(r"test_\w+", more):
            if test:
                assert re.search(rf"^def {test}\(", source, flags=re.M), f"{document} cites {path}::{test}, not there"
