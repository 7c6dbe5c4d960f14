"""Reading the published latency tables (the datasets folder and its README): one reader for
the server's import and the bench alike. Each space reads its own architecture list
(`SearchSpace.read_table_keys`); the latency tables share one format."""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the server's settings read `find_datasets` and must not load torch
    from predictor.spaces import SearchSpace

ENV_VAR = "LATFARM_DATASETS"


REFERENCE_TABLES = Path(__file__).resolve().parent / "reference_tables"


def find_datasets() -> Path:
    """`LATFARM_DATASETS` where it is set, else the published tables shipped in this package."""
    if env := os.environ.get(ENV_VAR):
        return Path(env)
    return REFERENCE_TABLES


def read_latencies(root: Path, space: SearchSpace) -> Iterator[tuple[int, str, float]]:
    """(dataset index, device, ms) of every row of the space's latency table."""
    with gzip.open(root / f"{space.name}_latency.csv.gz", "rt", newline="") as handle:
        rows = csv.reader(handle)  # by position: DictReader's per-row dicts doubled an import's parse time
        header = next(rows)
        index, device, latency = (header.index(column) for column in ("arch_idx", "device", "latency_ms"))
        for row in rows:
            yield int(row[index]), row[device], float(row[latency])
