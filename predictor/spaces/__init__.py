"""The search spaces, by name. Every space registers through the `latfarm.spaces` entry-point
group, latfarm's own (nb201, fbnet, ofa and onnx, in its pyproject.toml) like any installed
package's: `get_space(name)` and `space_names()` see every installed space, so a team ships its
space as a package of its own (see examples/chain_space).

An entry point names a `SearchSpace` subclass (instantiated once, with no arguments) or an
instance. One that fails to load is left out and reported by `load_failures()` (naming its
distribution and the error) instead of taking every user of the registry down with it.
"""

from __future__ import annotations

import logging
import threading
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Literal, overload

from .base import ArchGraph, InvalidArchitecture, SearchSpace

if TYPE_CHECKING:
    from predictor.graph.space import OnnxSpace

    from .fbnet import FBNetSpace
    from .nb201 import NB201Space
    from .ofa import OFASpace

__all__ = ["ENTRY_POINT_GROUP", "ArchGraph", "InvalidArchitecture", "SearchSpace", "UnknownSpace", "get_space",
           "load_failures", "load_spaces", "reference_spaces", "space_names"]

ENTRY_POINT_GROUP = "latfarm.spaces"
log = logging.getLogger(__name__)


class UnknownSpace(ValueError):
    """A search-space name that no installed space answers to."""


def load_spaces() -> tuple[dict[str, SearchSpace], dict[str, str]]:
    """Every space the entry points on `sys.path` register, and name -> why one failed to load."""
    spaces: dict[str, SearchSpace] = {}
    failures: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        origin = _distribution(entry)
        if (origin, entry.name) in seen:  # one distribution found twice on sys.path
            continue
        seen.add((origin, entry.name))
        try:
            space = _instantiate(entry)
            if entry.name in spaces:
                raise ValueError(f"another installed distribution already registers a space {entry.name!r}")
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not stop the others (nor the server)
            message = f"space {entry.name!r} of {origin} ({entry.value}) failed to load: {type(exc).__name__}: {exc}"
            log.error(message)
            failures[entry.name] = message
            continue
        spaces[entry.name] = space
    return dict(sorted(spaces.items())), failures


class _Registry:
    """The installed spaces, loaded on first use: a space's module may import `predictor.spaces`
    itself, which must be complete by then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: tuple[dict[str, SearchSpace], dict[str, str]] | None = None

    def loaded(self) -> tuple[dict[str, SearchSpace], dict[str, str]]:
        if self._loaded is not None:  # every get_space call: no lock once loaded
            return self._loaded
        with self._lock:
            if self._loaded is None:
                self._loaded = load_spaces()
            return self._loaded

    def spaces(self) -> dict[str, SearchSpace]:
        return self.loaded()[0]


def _distribution(entry: EntryPoint) -> str:
    dist = entry.dist
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


def _instantiate(entry: EntryPoint) -> SearchSpace:
    loaded = entry.load()
    space = loaded() if isinstance(loaded, type) else loaded
    if not isinstance(space, SearchSpace):
        raise TypeError(f"{entry.value} is not a predictor.spaces.SearchSpace (subclass or instance)")
    if space.name != entry.name:
        raise ValueError(f"the entry point is named {entry.name!r} but the space calls itself {space.name!r}")
    return space


_REGISTRY = _Registry()


def space_names() -> tuple[str, ...]:
    """Every installed space, by name."""
    return tuple(_REGISTRY.spaces())


def load_failures() -> dict[str, str]:
    """Space name -> why its entry point did not load (distribution, entry point, error)."""
    return dict(_REGISTRY.loaded()[1])


def reference_spaces() -> tuple[SearchSpace, ...]:
    """The spaces with published reference tables whose networks build: what the reference
    tables are imported for and what graph-encoded spaces learn from, through their exports."""
    return tuple(space for space in _REGISTRY.spaces().values() if space.has_reference_tables and space.builds_networks)


@overload
def get_space(name: Literal["nb201"]) -> NB201Space: ...
@overload
def get_space(name: Literal["fbnet"]) -> FBNetSpace: ...
@overload
def get_space(name: Literal["ofa"]) -> OFASpace: ...
@overload
def get_space(name: Literal["onnx"]) -> OnnxSpace: ...
@overload
def get_space(name: str) -> SearchSpace: ...


def get_space(name: str) -> SearchSpace:
    """The (shared, stateless) space called `name`."""
    spaces, failures = _REGISTRY.loaded()
    try:
        return spaces[name]
    except KeyError:
        failure = failures.get(name)
        if failure is not None:
            raise UnknownSpace(failure) from None
        if not spaces and not failures:
            raise UnknownSpace(f"no search space is installed (entry-point group {ENTRY_POINT_GROUP!r} is empty): "
                               "install latfarm again (`pip install -e .`) to register its own") from None
        raise UnknownSpace(f"unknown search space {name!r}; known: {', '.join(spaces)}") from None
