"""The search-space interface every space implements, and small helpers the spaces share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch  # torch loads on first use of build(), not on import


class InvalidArchitecture(ValueError):
    """A key that is not a member of the space; the message says what is wrong."""


@dataclass(frozen=True)
class ArchGraph:
    """An architecture as a DAG of operations, for graph encoders.

    `ops[i]` is the index of node i's operation in the space's `op_names`;
    `adjacency[i, j] == 1` means an edge from node i to node j (i < j, topological order).
    The first node is the input, the last the output.
    """

    ops: np.ndarray  # (n_nodes,) int64
    adjacency: np.ndarray  # (n_nodes, n_nodes) float32


class SearchSpace(ABC):
    """A family of architectures, each named by a canonical key."""

    name: str
    #: operation vocabulary of the graph encoding (includes "input" and "output")
    op_names: tuple[str, ...]
    #: (channels, height, width) of one input sample, for the default resolution
    input_shape: tuple[int, int, int]
    #: length of a `features()` row
    feature_dim: int
    #: the features start with this many one-hot columns of per-position choices; the rest are
    #: whole-architecture summaries (op shares, depths, ...)
    onehot_dim: int
    #: how many of those summaries, from the first, the few-shot adaptation regresses on
    #: (`predictor.cost.summary_features`); None: all of them
    summary_dim: ClassVar[int | None] = None
    #: a short description of a key, with an example (what `GET /api/v1/spaces` shows)
    key_format: ClassVar[str] = ""
    #: published latency tables ship for the space: `read_table_keys` reads its architectures and
    #: `latfarm datasets import` loads them, and its base predictor pre-trains on them
    has_reference_tables: ClassVar[bool] = False
    #: `build` makes a PyTorch module of each key (so the farm exports and measures it itself)
    builds_networks: ClassVar[bool] = True
    #: `features` is the graph encoding of `predictor.graph.encoding` (the `onnx` space's): a
    #: base predictor pre-trained on the reference spaces' ONNX exports serves the space, so it
    #: needs no reference table of its own
    graph_encoded: ClassVar[bool] = False

    @abstractmethod
    def canonical(self, key: str) -> str:
        """The canonical key of `key`; raises InvalidArchitecture if it is not in the space."""

    def network_key(self, key: str) -> str:
        """The key of the network `key` builds: keys that build the same network (dead code
        dropped, nodes relabelled) share it, and it is one of them. Spaces where every key builds
        its own network return the canonical key."""
        return self.canonical(key)

    def stand_in(self, network_key: str) -> str:
        """The network whose encoding (features, reference latencies) the predictor uses for
        `network_key`'s: itself, unless the reference tables cannot time that network as built
        and another runs the same layers."""
        return network_key

    def live_key(self, key: str) -> str:
        """`key` with its dead code removed but nothing relabelled: a key differs from its live
        key exactly when it holds code its network never runs."""
        return self.canonical(key)

    @abstractmethod
    def size(self) -> int:
        """How many architectures the space holds."""

    @abstractmethod
    def sample(self, n: int, seed: int) -> list[str]:
        """`n` distinct canonical keys drawn uniformly, reproducibly from `seed`."""

    def enumerate(self) -> Iterator[str]:
        """Every canonical key, in a fixed order; only for spaces small enough to list."""
        raise NotImplementedError(f"the {self.name} space is too large to enumerate")

    def is_bounded(self) -> bool:
        """Whether `size()` is the space's true size: False where the space holds whatever it
        has been shown (uploaded models)."""
        return True

    def is_connected(self, key: str) -> bool:
        """Whether the network's output depends on its input: samples of a space's table leave
        the keys that compute nothing out (NB201 cells with no input-output path)."""
        return True

    def read_table_keys(self, root: Path) -> dict[int, str]:
        """Dataset index -> canonical key of every architecture of the space's published table
        in the folder `root`, in file order (spaces with `has_reference_tables`)."""
        raise ValueError(f"no published table for the {self.name} space")

    def analytic_cost(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """(MACs, parameters) of the network each key builds, as int64 arrays, worked out from
        the keys (fast enough for whole spaces); None where the space has no analytic count."""
        return None

    def written_cost(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """`analytic_cost` of every operation each key names, dead code included: what a device
        that runs keys as written computes. Where there is one, the adaptation regresses on its
        log MACs and log parameters (of a network's own key where it reads per network)."""
        return self.analytic_cost(keys)

    @abstractmethod
    def graph(self, key: str) -> ArchGraph:
        """The operation graph of `key`."""

    @abstractmethod
    def features(self, keys: Sequence[str]) -> np.ndarray:
        """A fixed-length float32 vector per key, shape (len(keys), feature_dim)."""

    @abstractmethod
    def build(self, key: str) -> torch.nn.Module:
        """A PyTorch module of the architecture, in eval mode, taking `example_input()`."""

    def example_input(self, key: str, batch_size: int = 1) -> torch.Tensor:
        import torch

        return torch.randn(batch_size, *self.input_shape_of(key))

    def input_shape_of(self, key: str) -> tuple[int, int, int]:
        """Input shape for `key` (spaces with a searchable resolution override this)."""
        return self.input_shape

    def is_valid(self, key: str) -> bool:
        try:
            self.canonical(key)
        except InvalidArchitecture:
            return False
        return True


def check_sample_count(n: int, size: int) -> None:
    if not 0 <= n <= size:
        raise ValueError(f"cannot draw {n} distinct architectures from a space of {size}")


def sample_distinct(draw: Callable[[np.random.Generator], str], n: int, seed: int, size: int) -> list[str]:
    """`n` distinct keys from repeated uniform draws, in draw order.

    Rejection sampling: meant for spaces far larger than `n`, where repeats are rare.
    """
    check_sample_count(n, size)
    rng = np.random.default_rng(seed)
    keys: dict[str, None] = {}  # an ordered set
    while len(keys) < n:
        keys.setdefault(draw(rng))
    return list(keys)


def one_hot(ids: Sequence[int] | np.ndarray, depth: int) -> np.ndarray:
    """float32 one-hot rows, shape (len(ids), depth)."""
    return np.eye(depth, dtype=np.float32)[np.asarray(ids, dtype=np.int64)]


def chain_graph(block_ops: Sequence[int], input_op: int, output_op: int) -> ArchGraph:
    """input -> block_ops[0] -> ... -> block_ops[-1] -> output."""
    ops = np.array([input_op, *block_ops, output_op], dtype=np.int64)
    return ArchGraph(ops=ops, adjacency=np.eye(len(ops), k=1, dtype=np.float32))

