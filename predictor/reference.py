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
    without any (they timed exactly the network). A device that does not charge for dead code
    ran the built network, so what it timed of a network stands for every key building it that
    it did not time (the LatBench tables omit the disconnected cells, for one).

    `network_keys` and `dead` (which table keys hold dead code) are what `of` works out from the
    space, the slow part; checkpoints keep them, so a loaded predictor answers at once."""

    def __init__(self, space: SearchSpace, table: LatencyTable, network_keys: list[str],
                 network_of_row: np.ndarray, dead: np.ndarray) -> None:
        self.space = space
        self.table = table
        self.network_keys = network_keys
        #: per table key: its network's position in `network_keys`
        self.network_of_row = network_of_row
        #: per table key: whether it holds dead code (differs from its live key)
        self.dead = dead
        self.row = {key: i for i, key in enumerate(table.keys)}
        self.network_row = {key: i for i, key in enumerate(network_keys)}
        group, n_groups = network_of_row, len(network_keys)
        live_mean = _group_mean(table.log_ms, group, ~dead, n_groups)
        excess = table.log_ms[dead] - live_mean[group[dead]]
        with warnings.catch_warnings():  # a device that timed no key with dead code: NaN, then 0
            warnings.simplefilter("ignore", RuntimeWarning)
            cost = np.nanmean(excess, axis=0) if dead.any() else np.zeros(len(table.devices))
        #: per reference device: mean log-latency excess of keys holding dead code
        self.dead_code_cost = np.nan_to_num(cost)
        #: per reference device: whether it charges for dead code (timed every key as written)
        self.charges = self.dead_code_cost > DEAD_CODE_THRESHOLD
        all_mean = _group_mean(table.log_ms, group, np.ones(len(group), dtype=bool), n_groups)
        self.network_log_ms = np.where(self.charges[None, :], live_mean, all_mean).astype(np.float32)

    @classmethod
    def of(cls, space: SearchSpace, table: LatencyTable) -> MeasuredReference:
        network = [space.network_key(key) for key in table.keys]
        network_row = {key: i for i, key in enumerate(dict.fromkeys(network))}
        return cls(space, table, list(network_row), np.asarray([network_row[key] for key in network], dtype=np.int64),
                   np.asarray([space.live_key(key) != key for key in table.keys], dtype=bool))

    def log_ms(self, keys: list[str], per_network: bool) -> np.ndarray:
        """(len(keys), n_ref) measured log-latency, NaN where unmeasured. `per_network`: `keys`
        are network keys, read from the per-network table; else canonical keys, read as timed,
        and where a device that does not charge for dead code did not time one, its network's
        (`SearchSpace.stand_in`'s) latency on that device."""
        if per_network:
            return self._read(self.network_row, self.network_log_ms, keys)
        out = self._read(self.row, self.table.log_ms, keys)
        gaps = np.flatnonzero(np.isnan(out[:, ~self.charges]).any(axis=1))
        if len(gaps):
            networks = [self.space.stand_in(self.space.network_key(keys[i])) for i in gaps]
            filled = self._read(self.network_row, self.network_log_ms, networks)
            out[gaps] = np.where(np.isnan(out[gaps]) & ~self.charges[None, :], filled, out[gaps])
        return out

    def _read(self, index: dict[str, int], matrix: np.ndarray, keys: list[str]) -> np.ndarray:
        out = np.full((len(keys), len(self.table.devices)), np.nan, dtype=np.float32)
        rows = np.asarray([index.get(key, -1) for key in keys], dtype=np.int64)
        known = rows >= 0
        out[known] = matrix[rows[known]]
        return out


def _group_mean(values: np.ndarray, group: np.ndarray, use: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group and column: the mean of the non-NaN `values` of the rows `use` selects (NaN if
    none); every group 0..n_groups-1 has rows."""
    if len(group) == 0 or np.bincount(group, minlength=n_groups).min() == 0:
        raise ValueError("every group needs a row of the table")
    observed = np.isfinite(values) & use[:, None]
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(n_groups))
    sums = np.add.reduceat(np.where(observed, values, 0.0)[order], starts, axis=0, dtype=np.float64)
    counts = np.add.reduceat(observed[order], starts, axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
