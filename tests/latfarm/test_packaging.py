"""The client extra installs alone, and `requires-python` says what the installed packages' code
needs, as vermin reads it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_client_extra_installs_without_torch_or_the_server(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", f"{REPO}[client]"], check=True, cwd=tmp_path)
    probe = (
        "import importlib.util, sys\n"
        "heavy = ('torch', 'fastapi', 'sqlalchemy', 'onnxruntime')\n"
        "present = [name for name in heavy if importlib.util.find_spec(name)]\n"
        "assert not present, f'the client extra installed {present}'\n"
        "from latfarm import FarmClient, Job, NotFound\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('server', 'agent', 'predictor'))\n"
        "assert not leaked, leaked\n"
        "print(FarmClient.__module__)\n"
    )
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "latfarm.client"
