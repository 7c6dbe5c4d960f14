"""The task suite and the published latency tables, read straight from the datasets folder.

A task names `train` (reference) devices and `test` (target) devices of one space. `split`
is the only place where the two meet: pre-training sees rows of the train devices only, and a
test device is handed on as its keys and, separately, its ground truth for scoring.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from predictor.datasets import find_datasets, read_latencies
from predictor.reference import Row
from predictor.spaces import SearchSpace, get_space

TASKS_FILE = "tasks.json"


@dataclass(frozen=True)
class Task:
    name: str
    space: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    published: dict[str, float] = field(default_factory=dict)

    @property
    def published_k(self) -> int:
        return int(self.published.get("k", 20))


def load_tasks(root: Path | None = None) -> dict[str, Task]:
    """Every task of `tasks.json`, by name, in file order (N0..N5, F0..F5)."""
    root = root or find_datasets()
    with open(root / TASKS_FILE) as handle:
        spec = json.load(handle)["tasks"]
    tasks = {}
    for space, named in spec.items():
        for name, task in named.items():
            overlap = set(task["train"]) & set(task["test"])
            if overlap:
                raise ValueError(f"task {name}: devices both train and test: {sorted(overlap)}")
            tasks[name] = Task(name, space, tuple(task["train"]), tuple(task["test"]), dict(task.get("published", {})))
    return tasks


@dataclass
class SpaceTable:
    """All measured latencies of one space: canonical keys, and per device (key indices, ms)."""

    space: SearchSpace
    keys: list[str]
    latencies: dict[str, tuple[np.ndarray, np.ndarray]]  # device -> (indices into keys, ms)

    def device_keys(self, device: str) -> list[str]:
        return [self.keys[i] for i in self.latencies[self.require(device)][0]]

    def device_truth(self, device: str) -> dict[str, float]:
        index, ms = self.latencies[self.require(device)]
        return {self.keys[i]: float(v) for i, v in zip(index, ms)}

    def matrix(self, devices: tuple[str, ...] | list[str]) -> np.ndarray:
        """ms of every key (rows) on each device (columns), NaN where unmeasured."""
        out = np.full((len(self.keys), len(devices)), np.nan)
        for col, device in enumerate(devices):
            index, ms = self.latencies[self.require(device)]
            out[index, col] = ms
        return out

    def rows(self, devices: tuple[str, ...] | list[str]) -> Iterator[Row]:
        for device in devices:
            index, ms = self.latencies[self.require(device)]
            for i, v in zip(index.tolist(), ms.tolist()):
                yield self.keys[i], device, v

    def require(self, device: str) -> str:
        if device not in self.latencies:
            raise KeyError(f"device {device!r} has no {self.space.name} latencies")
        return device


@lru_cache(maxsize=4)
def load_space_table(root: Path, space_name: str) -> SpaceTable:
    """The space's latency table; keys that compute nothing (NB201 cells without an input-output
    path) are dropped."""
    if space_name not in ("nb201", "fbnet"):
        raise ValueError(f"the bench covers nb201 and fbnet, not {space_name!r}")
    space = get_space(space_name)
    by_index = {
        index: key for index, key in space.read_table_keys(root).items()
        if space.is_connected(key)
    }
    keys = list(by_index.values())
    position = {index: row for row, index in enumerate(by_index)}
    collected: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for index, device, ms in read_latencies(root, space):
        if index in position:
            rows, values = collected[device]
            rows.append(position[index])
            values.append(ms)
    latencies = {d: (np.asarray(i, dtype=np.int64), np.asarray(m)) for d, (i, m) in collected.items()}
    return SpaceTable(space, keys, latencies)


@dataclass(frozen=True)
class TestDevice:
    """A target device as the harness holds it: keys for samplers and methods, truth for scoring."""

    name: str
    keys: list[str]
    truth: dict[str, float]


@dataclass(frozen=True)
class Split:
    task: Task
    train_rows: list[Row]
    test_devices: list[TestDevice]


def split(task: Task, table: SpaceTable) -> Split:
    """Pre-training rows of the task's train devices only, and its test devices."""
    rows = list(table.rows(task.train))
    tests = [TestDevice(d, table.device_keys(d), table.device_truth(d)) for d in task.test]
    return Split(task, rows, tests)


def memoised_space(space: SearchSpace, keys: list[str]) -> SearchSpace:
    """The same space, with `canonical` and `features` of `keys` (canonical already) looked up.

    It is an instance of the space's own class, so it is a drop-in for pre-training, samplers
    and predictors; a bench recomputes the features of the same 15k keys hundreds of times, and
    on a couple of CPU cores that would dominate its run time. Other keys are computed as usual.
    """
    base_class = type(space)
    row_of = {key: row for row, key in enumerate(keys)}
    matrix = base_class.features(space, keys)

    class Memoised(base_class):  # type: ignore[valid-type, misc]  # the base is the space's class, known at run time
        def canonical(self, key: str) -> str:
            return key if key in row_of else base_class.canonical(self, key)

        def features(self, keys: list[str]) -> np.ndarray:
            try:
                rows = [row_of[key] for key in keys]
            except (KeyError, TypeError):
                return base_class.features(self, keys)
            return matrix[np.asarray(rows, dtype=np.int64)].reshape(len(rows), matrix.shape[1])

    Memoised.__name__ = Memoised.__qualname__ = f"Memoised{base_class.__name__}"
    memo = Memoised.__new__(Memoised)
    memo.__dict__.update(vars(space))
    return memo
