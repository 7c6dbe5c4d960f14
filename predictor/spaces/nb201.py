"""NAS-Bench-201: a 4-node cell with 5 candidate operations on each of its 6 edges."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from .base import ArchGraph, InvalidArchitecture, SearchSpace, check_sample_count, one_hot

if TYPE_CHECKING:
    import torch  # torch loads on first use of build(), not on import

#: operation ids are positions here; they match the `op_vec` digits of the NB201 dataset
OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NONE, SKIP = 0, 1
#: the cell's edges as (source node, target node), in arch-string order
EDGES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
OUTPUT_NODE = 3
#: node index of graph() by role: input, one node per edge, output
_GRAPH_INPUT, _GRAPH_OUTPUT = 0, len(EDGES) + 1


def _op_graph_adjacency() -> np.ndarray:
    """The fixed operation-graph adjacency: edge i->j's op feeds every op on an edge j->k."""
    n = len(EDGES) + 2
    adjacency = np.zeros((n, n), dtype=np.float32)
    for node, (source, target) in enumerate(EDGES, start=1):
        if source == 0:
            adjacency[_GRAPH_INPUT, node] = 1
        for upstream, (_, upstream_target) in enumerate(EDGES, start=1):
            if upstream_target == source:
                adjacency[upstream, node] = 1
        if target == OUTPUT_NODE:
            adjacency[node, _GRAPH_OUTPUT] = 1
    return adjacency


_ADJACENCY = _op_graph_adjacency()


@lru_cache(maxsize=len(OPS) ** len(EDGES))
def live_edges(ops: tuple[int, ...]) -> tuple[bool, ...]:
    """Per edge: whether it lies on a path of non-`none` edges from the cell input to its output.

    Other edges cannot change the cell's output: they are dead code or act on zeros.
    """
    present = [op != NONE for op in ops]
    from_input = {0}
    for (source, target), on in zip(EDGES, present):  # EDGES is in topological order
        if on and source in from_input:
            from_input.add(target)
    to_output = {OUTPUT_NODE}
    for (source, target), on in reversed(list(zip(EDGES, present))):
        if on and target in to_output:
            to_output.add(source)
    return tuple(on and s in from_input and t in to_output for (s, t), on in zip(EDGES, present))


#: the edge order after swapping the two intermediate nodes (possible when no edge joins them)
_SWAPPED_EDGES = (EDGES.index((0, 2)), EDGES.index((0, 1)), EDGES.index((1, 2)), EDGES.index((0, 3)),
                  EDGES.index((2, 3)), EDGES.index((1, 3)))


def live_ops(ops: tuple[int, ...]) -> tuple[int, ...]:
    """`ops` with every dead edge (see `live_edges`) set to `none`."""
    return tuple(op if on else NONE for op, on in zip(ops, live_edges(ops)))


def _parse(key: str) -> tuple[int, ...]:
    """The op id of each edge of an arch string like `|nor_conv_3x3~0|+|none~0|skip_connect~1|+|...|`."""
    return _space_index().op_tuples[_position(key)]


def _position(key: str) -> int:
    """Where `key` is in `enumerate` order; every valid string is a canonical key."""
    if not isinstance(key, str):
        raise InvalidArchitecture(f"an NB201 key is a string, not {type(key).__name__}")
    position = _space_index().position.get(key)
    if position is None:
        _reject(key)
    return position


def _reject(key: str) -> NoReturn:
    """Raise what is wrong with `key`, a string that is not a key of the space."""
    nodes = key.split("+")
    if len(nodes) != OUTPUT_NODE:
        raise InvalidArchitecture(f"expected {OUTPUT_NODE} nodes separated by '+', got {len(nodes)} in {key!r}")
    for target, node in enumerate(nodes, start=1):
        if len(node) < 2 or node[0] != "|" or node[-1] != "|":
            raise InvalidArchitecture(f"node {target} must be written '|op~input|...|', got {node!r}")
        edges = node[1:-1].split("|")
        if len(edges) != target:
            raise InvalidArchitecture(
                f"node {target} must have {target} input edge(s), from nodes 0..{target - 1}, "
                f"got {len(edges)}: {node!r}"
            )
        for source, edge in enumerate(edges):
            op, _, named_source = edge.partition("~")
            if named_source != str(source):
                raise InvalidArchitecture(
                    f"edge {source + 1} of node {target} must be 'op~{source}', got {edge!r}"
                )
            if op not in OPS:
                raise InvalidArchitecture(
                    f"unknown operation {op!r} on edge {source}->{target}; known: {', '.join(OPS)}"
                )
    raise InvalidArchitecture(f"{key!r} is not an NB201 architecture")


def _node_strings(target: int) -> dict[tuple[int, ...], str]:
    """Every way of writing node `target`, by the op ids of its input edges."""
    return {
        ops: "|" + "|".join(f"{OPS[op]}~{source}" for source, op in enumerate(ops)) + "|"
        for ops in itertools.product(range(len(OPS)), repeat=target)
    }


_NODE_STRINGS = [_node_strings(target) for target in range(1, OUTPUT_NODE + 1)]


def _key_of(op_vec: Sequence[int]) -> str:
    ops = tuple(op_vec)
    return f"{_NODE_STRINGS[0][ops[:1]]}+{_NODE_STRINGS[1][ops[1:3]]}+{_NODE_STRINGS[2][ops[3:]]}"


@dataclass(frozen=True)
class _SpaceIndex:
    """Every key of the space at once, in `enumerate` order (the op vectors read as base-5
    numbers): whole-space questions become array look-ups."""

    keys: list[str]
    position: dict[str, int]
    op_tuples: list[tuple[int, ...]]
    ops: np.ndarray  # (n, 6) int64
    live: np.ndarray  # (n, 6) bool, `live_edges` of each
    #: (n,) position of the key of the network each key builds: of its live ops (dead edges set
    #: to `none`) and their copy with nodes 1 and 2 swapped (the same graph relabelled, when no
    #: live edge joins them), the smaller op vector
    network: np.ndarray


@cache
def _space_index() -> _SpaceIndex:
    op_tuples = list(itertools.product(range(len(OPS)), repeat=len(EDGES)))
    keys = [_key_of(ops) for ops in op_tuples]
    ops = np.asarray(op_tuples, dtype=np.int64)
    live = np.asarray([live_edges(op_tuple) for op_tuple in op_tuples], dtype=bool)
    live_ops = np.where(live, ops, NONE)
    digits = len(OPS) ** np.arange(len(EDGES) - 1, -1, -1)  # the first edge is the most significant digit
    code, swapped = live_ops @ digits, live_ops[:, _SWAPPED_EDGES] @ digits
    network = np.where(live_ops[:, EDGES.index((1, 2))] != NONE, code, np.minimum(code, swapped))
    return _SpaceIndex(keys, {key: i for i, key in enumerate(keys)}, op_tuples, ops, live, network)


def _positions(keys: Sequence[str]) -> np.ndarray:
    position = _space_index().position
    try:
        return np.asarray([position[key] for key in keys], dtype=np.int64)
    except (KeyError, TypeError):
        return np.asarray([_position(key) for key in keys], dtype=np.int64)  # raises for the first invalid key


#: the network every disconnected cell builds: stem, reduction blocks and head, around cells
#: that output zeros
SKELETON = _key_of((NONE,) * len(EDGES))
#: the network whose cells pass their input straight to the output: the skeleton's layers, with
#: no multiply by zero per cell
IDENTITY_CELL = _key_of(tuple(SKIP if edge == (0, OUTPUT_NODE) else NONE for edge in EDGES))


class NB201Space(SearchSpace):
    """NAS-Bench-201 cells in the CIFAR-10 macro-architecture (15,625 architectures)."""

    name = "nb201"
    op_names = (*OPS, "input", "output")
    input_shape = (3, 32, 32)
    feature_dim = len(EDGES) * len(OPS) + len(OPS) + (len(OPS) - 1) + 1
    onehot_dim = len(EDGES) * len(OPS)
    # the op shares of the key as read: a device's own network's ops where it is read per network
    # (the live shares repeat them there), the ops a device charging for dead code runs where keys
    # are read as written; the live shares and the connected flag spread the descriptors' prior
    # over near-copies (docs/adaptation.md has the figures)
    summary_dim = len(OPS)
    key_format = "NAS-Bench-201 arch string, one op~input per edge: |nor_conv_3x3~0|+|skip_connect~0|none~1|+|...|"
    has_reference_tables = True

    def canonical(self, key: str) -> str:
        return _space_index().keys[_position(key)]

    def read_table_keys(self, root: Path) -> dict[int, str]:
        with open(root / "nb201_archs.csv", newline="") as handle:
            return {int(row["nb201_idx"]): self.canonical(row["arch_str"]) for row in csv.DictReader(handle)}

    def analytic_cost(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        from predictor.cost import nb201_cost

        return nb201_cost(self, keys)

    def written_cost(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        from predictor.cost import nb201_cost

        return nb201_cost(self, keys, dead_code=True)

    def network_key(self, key: str) -> str:
        """The cell with dead edges removed, up to relabelling its intermediate nodes: 8,765
        networks among the 15,625 keys (every disconnected cell builds the same one)."""
        index = _space_index()
        return index.keys[index.network[_position(key)]]

    def live_key(self, key: str) -> str:
        return self.from_op_vec(live_ops(_parse(key)))

    def stand_in(self, network_key: str) -> str:
        """The skeleton (every disconnected cell's network) is encoded as the identity-cell
        network, whose layers it runs plus one multiply by zero per cell: the LatBench tables
        never timed it, and HW-NAS-Bench's Pixel 3 and Raspberry Pi 4 columns time it at 4 and
        12 us, under 1 % of their identity-cell network (as if their converters folded away a
        network whose output is a constant); the 25 other HELP devices time it at 0.99-1.40 times
        their identity-cell network (median 1.065)."""
        return IDENTITY_CELL if network_key == SKELETON else network_key

    def op_vec(self, key: str) -> tuple[int, ...]:
        """The op id (position in OPS) of each edge, in EDGES order."""
        return _parse(key)

    def op_table(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(len(keys), 6) op ids of each key's edges, and which of them are live (`live_edges`)."""
        index, positions = _space_index(), _positions(keys)
        return index.ops[positions], index.live[positions]

    def from_op_vec(self, op_vec: Sequence[int]) -> str:
        if len(op_vec) != len(EDGES) or not all(op in range(len(OPS)) for op in op_vec):
            raise InvalidArchitecture(f"an op vector is {len(EDGES)} ids in 0..{len(OPS) - 1}, got {list(op_vec)}")
        return _key_of(op_vec)

    def size(self) -> int:
        return len(OPS) ** len(EDGES)

    def enumerate(self) -> Iterator[str]:
        """All keys, in the order of their op vectors read as base-5 numbers."""
        return (self.from_op_vec(ops) for ops in itertools.product(range(len(OPS)), repeat=len(EDGES)))

    def _key_at(self, index: int) -> str:
        digits = np.unravel_index(index, (len(OPS),) * len(EDGES))
        return self.from_op_vec([int(d) for d in digits])

    def sample(self, n: int, seed: int) -> list[str]:
        check_sample_count(n, self.size())
        indices = np.random.default_rng(seed).choice(self.size(), size=n, replace=False)
        return [self._key_at(int(i)) for i in indices]

    def is_connected(self, key: str) -> bool:
        """Whether any path of non-`none` edges joins the cell input to its output."""
        return any(live_edges(_parse(key)))

    def graph(self, key: str) -> ArchGraph:
        """One node per edge operation (`none` included), between an input and an output node."""
        ops = [self.op_names.index("input"), *_parse(key), self.op_names.index("output")]
        return ArchGraph(ops=np.array(ops, dtype=np.int64), adjacency=_ADJACENCY.copy())

    def features(self, keys: Sequence[str]) -> np.ndarray:
        """Per key: one-hot op of each edge (30), share of edges per op (5), share of live edges
        per non-`none` op (4, see `live_edges`) and whether the cell is connected (1)."""
        ops, live = self.op_table(keys)
        live = live.astype(np.float32)
        edges = one_hot(ops.ravel(), len(OPS)).reshape(len(keys), len(EDGES), len(OPS))
        return np.hstack([
            edges.reshape(len(keys), self.onehot_dim),
            edges.mean(axis=1),
            (edges * live[:, :, None]).mean(axis=1)[:, NONE + 1:],
            live.any(axis=1, keepdims=True),
        ]).astype(np.float32)

    def build(self, key: str) -> torch.nn.Module:
        from ._nb201_net import nb201_network

        return nb201_network([OPS[op] for op in _parse(key)]).eval()
