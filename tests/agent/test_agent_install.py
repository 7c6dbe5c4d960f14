"""`pip install '.[agent]'` alone gives a working agent that needs none of the server's stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_agent_extra_installs_and_runs_alone(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{REPO}[agent]"], check=True, cwd=tmp_path)

    help_text = subprocess.run([str(venv / "bin" / "latfarm-agent"), "--help"], check=True, capture_output=True,
                               text=True).stdout
    assert "--server" in help_text and "--token" in help_text

    for heavy in ("torch", "fastapi", "sqlalchemy", "typer"):
        found = subprocess.run([str(python), "-c", f"import {heavy}"], capture_output=True, cwd=tmp_path)
        assert found.returncode != 0, f"the agent extra pulled in {heavy}"
    probe = (
        "import sys, agent.cli, agent.worker, agent.timing, agent.client, agent.cache, agent.capabilities\n"
        "caps = agent.capabilities.detect_capabilities()\n"
        "assert caps.runtimes.get('onnxruntime'), caps\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('server', 'predictor'))\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([str(python), "-c", probe], check=True, cwd=tmp_path)
