"""`requires-python` says what the installed packages' code needs, as vermin reads it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

#: what the wheel installs; the tests, benchmarks and examples run on the development Python only
PACKAGES = ["latfarm", "agent", "server", "predictor", "migrations"]


def test_requires_python_is_what_the_code_needs() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    declared = re.search(r'^requires-python = ">=(\d+\.\d+)"$', pyproject, re.MULTILINE)
    assert declared, "requires-python is not of the form >=X.Y"
    # union types (X | None) count: pydantic and typer evaluate annotations at run time
    vermin = Path(sys.executable).parent / "vermin"  # it has no `python -m` entry
    done = subprocess.run([str(vermin), "--no-tips", "--no-parse-comments", "--eval-annotations",
                           "--feature", "union-types", *PACKAGES], cwd=REPO, capture_output=True, text=True, check=True)
    needed = re.search(r"^Minimum required versions: (\d+\.\d+)$", done.stdout, re.MULTILINE)
    assert needed, done.stdout
    assert needed.group(1) == declared.group(1), done.stdout
