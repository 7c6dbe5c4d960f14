"""Reading the published latency tables (the datasets folder and its README): one reader for
the server's import and the bench alike."""

from __future__ import annotations

import csv
import gzip
import json
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


def read_arch_keys(root: Path, space: SearchSpace) -> dict[int, str]:
    """Dataset index -> canonical key of every architecture of the space's table, in file order."""
    if space.name == "nb201":
        with open(root / "nb201_archs.csv", newline="") as handle:
            return {int(row["nb201_idx"]): space.canonical(row["arch_str"]) for row in csv.DictReader(handle)}
    if space.name == "fbnet":
        with open(root / "fbnet_archs.csv", newline="") as handle:
            return {int(row["fbnet_idx"]): space.canonical(row["ops"]) for row in csv.DictReader(handle)}
    if space.name == "ofa":
        keys = {}
        with open(root / "ofa_archs.jsonl") as handle:
            for line in handle:
                record = json.loads(line)
                index = record.pop("ofa_idx")
                keys[int(index)] = space.canonical(json.dumps(record))
        return keys
    raise ValueError(f"no published table for the {space.name} space")


def read_latencies(root: Path, space: SearchSpace) -> Iterator[tuple[int, str, float]]:
    """(dataset index, device, ms) of every row of the space's latency table."""
    with gzip.open(root / f"{space.name}_latency.csv.gz", "rt", newline="") as handle:
        for row in csv.DictReader(handle):
            yield int(row["arch_idx"]), row["device"], float(row["latency_ms"])
