"""The search spaces, by name: `get_space("nb201")`, `get_space("fbnet")`, `get_space("ofa")`."""

from __future__ import annotations

from typing import Literal, overload

from .base import ArchGraph, InvalidArchitecture, SearchSpace
from .fbnet import FBNetSpace
from .nb201 import NB201Space
from .ofa import OFASpace

__all__ = ["SPACES", "ArchGraph", "InvalidArchitecture", "SearchSpace", "UnknownSpace", "get_space"]


class UnknownSpace(ValueError):
    """A search-space name that is not one of SPACES."""


_INSTANCES: dict[str, SearchSpace] = {space.name: space for space in (NB201Space(), FBNetSpace(), OFASpace())}
SPACES: tuple[str, ...] = tuple(_INSTANCES)


@overload
def get_space(name: Literal["nb201"]) -> NB201Space: ...
@overload
def get_space(name: Literal["fbnet"]) -> FBNetSpace: ...
@overload
def get_space(name: Literal["ofa"]) -> OFASpace: ...
@overload
def get_space(name: str) -> SearchSpace: ...


def get_space(name: str) -> SearchSpace:
    """The (shared, stateless) space called `name`."""
    try:
        return _INSTANCES[name]
    except KeyError:
        raise UnknownSpace(f"unknown search space {name!r}; known: {', '.join(SPACES)}") from None
