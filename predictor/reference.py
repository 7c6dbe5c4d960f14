"""Reference-device tables: the (architecture, device, ms) rows a base predictor learns from."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from predictor.spaces import SearchSpace

Row = tuple[str, str, float]


@dataclass(frozen=True)
class LatencyTable:
    """A dense view of sparse rows: log-latency per (architecture, device), NaN where unmeasured."""

    keys: list[str]
    devices: list[str]
    log_ms: np.ndarray  # (len(keys), len(devices)) float32

    @classmethod
    def from_rows(cls, space: SearchSpace, rows: Iterable[Row]) -> LatencyTable:
        key_index: dict[str, int] = {}
        device_index: dict[str, int] = {}
        cells: list[tuple[int, int, float]] = []
        canonical_cache: dict[str, str] = {}
        for key, device, ms in rows:
            if not (ms > 0 and np.isfinite(ms)):
                raise ValueError(f"latency of {key!r} on {device!r} must be a positive finite number, got {ms}")
            canonical = canonical_cache.get(key)
            if canonical is None:
                canonical = canonical_cache[key] = space.canonical(key)
            row = key_index.setdefault(canonical, len(key_index))
            col = device_index.setdefault(device, len(device_index))
            cells.append((row, col, ms))
        if not cells:
            raise ValueError("the reference table is empty")
        log_ms = np.full((len(key_index), len(device_index)), np.nan, dtype=np.float32)
        rows_idx, cols_idx, values = (np.asarray(column) for column in zip(*cells))
        log_ms[rows_idx.astype(np.int64), cols_idx.astype(np.int64)] = np.log(values.astype(np.float64))
        return cls(keys=list(key_index), devices=list(device_index), log_ms=log_ms)
