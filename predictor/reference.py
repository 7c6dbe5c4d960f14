"""Reference-device tables: the (architecture, device, ms) rows a base predictor learns from."""

from __future__ import annotations

import warnings
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
    def from_rows(cls, space: SearchSpace, rows: Iterable[Row]) -> "LatencyTable":
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


#: a reference device "charges for dead code" when keys holding dead code take this much longer
#: (mean excess in log-latency) than the same network without it; on the NB201 tables the
#: HELP/BRP-NAS devices charge 15-36 % (they timed every cell as written) and the HW-NAS-Bench
#: ones -1.6 to +2.8 % (noise), see docs/bench/lodo.md
DEAD_CODE_THRESHOLD = 0.05


class MeasuredReference:
    """The reference devices' measured latencies as the predictor uses them: per key as the
    tables timed it, and per network (for devices that run only the built network, as the farm's
    exports do). A network's latency on a reference device is the mean over the keys building
    it that the device timed; on a device that charges for dead code, only over the keys
    without any (they timed exactly the network)."""

    def __init__(self, space: SearchSpace, table: LatencyTable) -> None:
        self.space = space
        self.table = table
        self.row = {key: i for i, key in enumerate(table.keys)}
        network = [space.network_key(key) for key in table.keys]
        dead = np.asarray([space.live_key(key) != key for key in table.keys], dtype=bool)
        self.network_row = {key: i for i, key in enumerate(dict.fromkeys(network))}
        group = np.asarray([self.network_row[key] for key in network], dtype=np.int64)
        live_mean = _group_mean(table.log_ms, group, ~dead, len(self.network_row))
        excess = table.log_ms[dead] - live_mean[group[dead]]
        with warnings.catch_warnings():  # a device that timed no key with dead code: NaN, then 0
            warnings.simplefilter("ignore", RuntimeWarning)
            cost = np.nanmean(excess, axis=0) if dead.any() else np.zeros(len(table.devices))
        #: per reference device: mean log-latency excess of keys holding dead code
        self.dead_code_cost = np.nan_to_num(cost)
        charges = self.dead_code_cost > DEAD_CODE_THRESHOLD
        all_mean = _group_mean(table.log_ms, group, np.ones(len(group), dtype=bool), len(self.network_row))
        self.network_log_ms = np.where(charges[None, :], live_mean, all_mean).astype(np.float32)

    def log_ms(self, keys: list[str], per_network: bool) -> np.ndarray:
        """(len(keys), n_ref) measured log-latency, NaN where unmeasured; `per_network`: `keys`
        are network keys, read from the per-network table."""
        index, matrix = (self.network_row, self.network_log_ms) if per_network else (self.row, self.table.log_ms)
        out = np.full((len(keys), len(self.table.devices)), np.nan, dtype=np.float32)
        rows = np.asarray([index.get(key, -1) for key in keys], dtype=np.int64)
        known = rows >= 0
        out[known] = matrix[rows[known]]
        return out


def _group_mean(values: np.ndarray, group: np.ndarray, use: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group and column: the mean of the non-NaN `values` of the rows `use` selects (NaN if none)."""
    observed = np.isfinite(values) & use[:, None]
    sums = np.zeros((n_groups, values.shape[1]))
    counts = np.zeros((n_groups, values.shape[1]))
    np.add.at(sums, group, np.where(observed, values, 0.0))
    np.add.at(counts, group, observed)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
