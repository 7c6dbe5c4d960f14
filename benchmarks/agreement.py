"""Do two agents agree? Two real agent processes (two device names on this host) measure the same
NB201 artifacts with one preset, one after the other so they never share a core; prints the
median of the per-architecture latency ratios and the Spearman rank correlation.

    python benchmarks/agreement.py --archs 50 --preset standard

Ends with `agreement: archs=N median_ratio=R rho=P flagged_a=.. flagged_b=..`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latfarm import FarmClient, Job  # noqa: E402
from latfarm.models import Preset  # noqa: E402
from predictor.spaces import get_space  # noqa: E402
from server.cli.local import running_agent, running_server  # noqa: E402
from server.db import upgrade  # noqa: E402
from server.settings import Settings  # noqa: E402

ADMIN_TOKEN = "agreement-bench-admin"


def measure_on(url: str, device: str, keys: list[str], preset: Preset, workdir: Path) -> list[Job]:
    agent_dir = workdir / device
    agent_dir.mkdir()
    with running_agent(url, ADMIN_TOKEN, device, 1, agent_dir), FarmClient(url, ADMIN_TOKEN) as farm:
        farm.wait_for_device(device)
        return farm.measure(device, "nb201", keys, preset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", type=int, default=50)
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keys = get_space("nb201").sample(args.archs, args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="latfarm-agreement-"))
    url_db = f"sqlite:///{workdir / 'latfarm.db'}"
    upgrade(url_db)
    settings = Settings(database_url=url_db, artifact_dir=workdir / "artifacts", admin_token=ADMIN_TOKEN,
                        poll_wait_s=2.0)
    with running_server(settings) as url:
        a = measure_on(url, "agree-a", keys, args.preset, workdir)
        b = measure_on(url, "agree-b", keys, args.preset, workdir)
    pairs = [(x.latency_ms, y.latency_ms) for x, y in zip(a, b) if x.status == y.status == "done"]
    la, lb = np.asarray(pairs).T
    ratio = float(np.median(la / lb))
    rho = float(spearmanr(la, lb).statistic)
    flagged_a = sum(bool(job.flags) for job in a)
    flagged_b = sum(bool(job.flags) for job in b)
    print(f"agreement: archs={len(pairs)} preset={args.preset} median_ratio={ratio:.4f} rho={rho:.4f} "
          f"flagged_a={flagged_a} flagged_b={flagged_b}")


if __name__ == "__main__":
    main()
