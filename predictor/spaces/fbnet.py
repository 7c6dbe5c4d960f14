"""The FBNet space of HW-NAS-Bench and HELP: one of 9 operations in each of 22 blocks."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .base import ArchGraph, InvalidArchitecture, SearchSpace, chain_graph, one_hot, sample_distinct

if TYPE_CHECKING:
    import torch  # torch loads on first use of build(), not on import

#: operation ids are positions here; they match the `op_vec` digits of the FBNet dataset
OPS = ("k3_e1", "k3_e1_g2", "k3_e3", "k3_e6", "k5_e1", "k5_e1_g2", "k5_e3", "k5_e6", "skip")
#: (kernel, expansion, groups of the 1x1 convolutions) of each inverted-residual operation
BLOCK_SHAPES = {
    "k3_e1": (3, 1, 1), "k3_e1_g2": (3, 1, 2), "k3_e3": (3, 3, 1), "k3_e6": (3, 6, 1),
    "k5_e1": (5, 1, 1), "k5_e1_g2": (5, 1, 2), "k5_e3": (5, 3, 1), "k5_e6": (5, 6, 1),
}
#: (output channels, blocks, stride of the first block) of each stage
STAGES = ((16, 1, 1), (24, 4, 2), (32, 4, 2), (64, 4, 2), (112, 4, 1), (184, 4, 2), (352, 1, 1))
N_BLOCKS = sum(blocks for _, blocks, _ in STAGES)
SEPARATOR = "|"


def _parse(key: str) -> tuple[int, ...]:
    if not isinstance(key, str):
        raise InvalidArchitecture(f"an FBNet key is a string, not {type(key).__name__}")
    names = key.split(SEPARATOR)
    if len(names) != N_BLOCKS:
        raise InvalidArchitecture(f"expected {N_BLOCKS} operations separated by {SEPARATOR!r}, got {len(names)}")
    for block, name in enumerate(names):
        if name not in OPS:
            raise InvalidArchitecture(f"unknown operation {name!r} in block {block}; known: {', '.join(OPS)}")
    return tuple(OPS.index(name) for name in names)


class FBNetSpace(SearchSpace):
    """FBNet blocks in an ImageNet MobileNet-like macro-architecture (9^22 architectures)."""

    name = "fbnet"
    op_names = (*OPS, "input", "output")
    input_shape = (3, 224, 224)
    feature_dim = N_BLOCKS * len(OPS) + len(OPS)
    onehot_dim = N_BLOCKS * len(OPS)
    key_format = f"{N_BLOCKS} block operations ({', '.join(OPS)}) joined by {SEPARATOR!r}: k3_e1|k5_e6|skip|..."
    has_reference_tables = True

    def canonical(self, key: str) -> str:
        return self.from_op_vec(_parse(key))

    def read_table_keys(self, root: Path) -> dict[int, str]:
        with open(root / "fbnet_archs.csv", newline="") as handle:
            return {int(row["fbnet_idx"]): self.canonical(row["ops"]) for row in csv.DictReader(handle)}

    def analytic_cost(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        from predictor.cost import fbnet_cost

        return fbnet_cost(self, keys)

    def op_vec(self, key: str) -> tuple[int, ...]:
        """The op id (position in OPS) of each block."""
        return _parse(key)

    def from_op_vec(self, op_vec: Sequence[int]) -> str:
        if len(op_vec) != N_BLOCKS or not all(op in range(len(OPS)) for op in op_vec):
            raise InvalidArchitecture(f"an op vector is {N_BLOCKS} ids in 0..{len(OPS) - 1}, got {list(op_vec)}")
        return SEPARATOR.join(OPS[op] for op in op_vec)

    def size(self) -> int:
        return len(OPS) ** N_BLOCKS

    def sample(self, n: int, seed: int) -> list[str]:
        def draw(rng: np.random.Generator) -> str:
            return self.from_op_vec(rng.integers(len(OPS), size=N_BLOCKS).tolist())

        return sample_distinct(draw, n, seed, self.size())

    def graph(self, key: str) -> ArchGraph:
        return chain_graph(_parse(key), self.op_names.index("input"), self.op_names.index("output"))

    def features(self, keys: Sequence[str]) -> np.ndarray:
        """Per key: one-hot op of each block (22 x 9) and the share of blocks per op (9)."""
        rows = []
        for key in keys:
            blocks = one_hot(_parse(key), len(OPS))
            rows.append(np.concatenate([blocks.ravel(), blocks.mean(axis=0)]))
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), self.feature_dim)

    def build(self, key: str) -> torch.nn.Module:
        from ._fbnet_net import fbnet_network

        return fbnet_network([OPS[op] for op in _parse(key)]).eval()
