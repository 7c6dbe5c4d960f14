"""Graph encodings of built-in spaces' architectures, through their ONNX exports.

The graph-level predictor learns from the reference tables of every space: each architecture is
exported to ONNX by the same exporter the server uses (`predictor.export.export_onnx`) and
encoded from the graph. Exporting costs 0.3-0.6 s per architecture, so the encodings are kept in
a JSON-lines cache that a later run resumes (one line per architecture, appended as they come).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from predictor.export import export_onnx
from predictor.graph.encoding import FEATURE_DIM, encode_onnx
from predictor.spaces import SearchSpace


@dataclass(frozen=True)
class ExportedArch:
    """One architecture of a built-in space as the `onnx` space sees it."""

    space: str
    key: str
    sha256: str
    vector: np.ndarray


def table_sample(root: Path, space: SearchSpace, n: int, seed: int = 0) -> list[str]:
    """`n` architectures of the space's published table, drawn reproducibly (keys that compute
    nothing, `SearchSpace.is_connected`, are left out)."""
    keys = [key for key in space.read_table_keys(root).values() if space.is_connected(key)]
    picks = np.random.default_rng(seed).permutation(len(keys))[:n]
    return [keys[i] for i in sorted(picks)]


def encode_exports(space: SearchSpace, keys: Sequence[str], cache: Path | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, ExportedArch]:
    """key -> its exported encoding, for each of `keys`; those already in `cache` are read back."""
    found = read_cache(cache, space.name) if cache is not None else {}
    missing = [key for key in keys if key not in found]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    for done, key in enumerate(missing, 1):
        encoding = encode_onnx(export_onnx(space, key))
        found[key] = ExportedArch(space.name, key, encoding.sha256, encoding.vector)
        if cache is not None:
            with open(cache, "a") as handle:
                handle.write(json.dumps({"space": space.name, "key": key, "sha256": encoding.sha256,
                                         "vector": encoding.vector.tolist()}) + "\n")
        if progress is not None:
            progress(done, len(missing))
    return {key: found[key] for key in keys}


def read_cache(cache: Path, space: str) -> dict[str, ExportedArch]:
    found: dict[str, ExportedArch] = {}
    if not cache.exists():
        return found
    with open(cache) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interrupted run
                continue
            vector = np.asarray(record["vector"], dtype=np.float32)
            if record["space"] == space and vector.shape == (FEATURE_DIM,):
                found[record["key"]] = ExportedArch(space, record["key"], record["sha256"], vector)
    return found
