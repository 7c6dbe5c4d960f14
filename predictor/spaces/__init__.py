"""The search spaces, by name: `get_space("nb201")`, `get_space("fbnet")`, `get_space("ofa")`, and
`get_space("onnx")` (any ONNX model, keyed by its sha256; see `predictor.graph`)."""

from __future__ import annotations

from predictor.graph.space import OnnxSpace  # noqa: E402 - it builds on .base

from .base import ArchGraph, InvalidArchitecture, SearchSpace
from .fbnet import FBNetSpace
from .nb201 import NB201Space
from .ofa import OFASpace

__all__ = ["BUILT_IN_SPACES", "SPACES", "ArchGraph", "InvalidArchitecture", "SearchSpace", "UnknownSpace", "get_space"]


class UnknownSpace(ValueError):
    """A search-space name that is not one of SPACES."""


_INSTANCES: dict[str, SearchSpace] = {
    space.name: space for space in (NB201Space(), FBNetSpace(), OFASpace(), OnnxSpace())
}
SPACES: tuple[str, ...] = tuple(_INSTANCES)
#: the spaces with published reference tables and a PyTorch builder
BUILT_IN_SPACES: tuple[str, ...] = ("nb201", "fbnet", "ofa")


def get_space(name: str) -> SearchSpace:
    """The (shared, stateless) space called `name`."""
    try:
        return _INSTANCES[name]
    except KeyError:
        raise UnknownSpace(f"unknown search space {name!r}; known: {', '.join(SPACES)}") from None
