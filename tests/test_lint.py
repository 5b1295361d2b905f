"""The code is formatted and lint-clean by the project's own ruff settings (pyproject.toml [tool.ruff])."""

import subprocess
import sys

from tests.helpers import REPO

PATHS = ["aevb_dist", "tests", "benchmarks"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args, *PATHS], cwd=REPO, capture_output=True, text=True)


def test_ruff_finds_nothing_to_fix():
    found = ruff("check", "--output-format", "concise")
    assert found.returncode == 0, found.stdout[-4000:] + found.stderr[-2000:]


def test_the_code_is_formatted_as_ruff_formats_it():
    formatted = ruff("format", "--check")
    assert formatted.returncode == 0, formatted.stdout[-4000:] + formatted.stderr[-2000:]
