"""What a runtime module in this package provides, and the parts they share.

A runtime module (named like its `Runtime` value) has:

- `INSTALL`: what to install for it, for the message an agent without it gives;
- `installed_version() -> str | None`: its version where it is installed, found without importing
  a heavy runtime (the agent reports it; only a measurement child imports the runtime);
- `Backend(settings: LoadSettings)`: the `Backend` protocol below. Its constructor imports the
  runtime and raises `RuntimeUnavailable` when it cannot run here as asked.

`agent.timing` drives a backend in its child process: `load`, then `prepare`, then the returned
callable inside `running()`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

#: the settings a measurement ran under (threads, execution mode, delegate, ...), for its provenance
Execution = dict[str, str | int | float | bool]


class RuntimeUnavailable(Exception):
    """The runtime cannot run here as asked (not installed, no such execution provider, no GPU)."""


@dataclass(frozen=True)
class LoadSettings:
    """How to load one artifact: the file, the thread count, the execution provider (ONNX Runtime
    only; None: its CPU provider) and the folder compiled engines are cached in (GPU runtimes)."""

    model_path: str
    threads: int
    provider: str | None = None
    engine_cache_dir: str | None = None


class Backend(Protocol):
    """One runtime in the measurement child. `execution` and `providers` describe the settings
    and accelerators the measurement ran under; `inputs` the input shapes `prepare` made;
    `build_ms` the part of `load` spent building an engine (None: none was built)."""

    version: str
    execution: Execution
    providers: list[str]
    inputs: dict[str, list[int]]
    build_ms: float | None

    def load(self) -> None:
        """Build the model (timed as the load)."""

    def prepare(self, seed: int) -> Callable[[], object]:
        """Random inputs; returns one inference."""

    def running(self) -> contextlib.AbstractContextManager[object]:
        """The context inferences run in (e.g. torch's inference mode)."""


def distribution_version(module: str, distribution: str) -> str | None:
    """The installed version of `distribution` when `module` is importable, else None; found
    without importing it."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # importable, but not installed as a distribution
        return "unknown"


def concrete_shape(dims: Sequence[Any] | None) -> list[int]:
    """A declared input shape with its symbolic or unknown dimensions set to 1 (batch 1)."""
    return [d if isinstance(d, int) and d > 0 else 1 for d in (dims or [])]


def random_input(rng: np.random.Generator, shape: Sequence[int], dtype: Any) -> np.ndarray:
    """Standard-normal values for a floating type, 0/1 for the others."""
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 2, size=shape).astype(dtype)
