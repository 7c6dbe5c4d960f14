"""What importing a module costs: the server's settings (read by every CLI command) load no torch."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_importing_the_settings_loads_no_torch() -> None:
    code = "import sys, server.settings; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.strip() == "False"
