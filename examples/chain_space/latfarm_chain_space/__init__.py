"""The `chain` space: a stem, three searchable convolution blocks and a classifier, on 64x64 inputs.

Each block picks a kernel size (3 or 5) and a width (16, 32 or 64 channels); blocks 2 and 3 halve
the resolution. A key names the three choices joined by "-", e.g. "k3_w16-k5_w32-k3_w64":
6^3 = 216 architectures. There are no published latency tables for it: its features are the
graph encoding of each key's ONNX export (`GraphEncodedSpace`), so latfarm's graph-level base
predictor, pre-trained on the reference spaces' exports, serves it from the first onboarding.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from predictor.graph.encoded import GraphEncodedSpace
from predictor.spaces.base import ArchGraph, InvalidArchitecture, chain_graph, check_sample_count

if TYPE_CHECKING:
    import torch

KERNELS = (3, 5)
WIDTHS = (16, 32, 64)
OPS = tuple(f"k{kernel}_w{width}" for kernel in KERNELS for width in WIDTHS)
N_BLOCKS = 3
STRIDES = (1, 2, 2)
STEM_CHANNELS = 16
N_CLASSES = 10
SEPARATOR = "-"


def parse(key: str) -> tuple[int, ...]:
    """The op id (position in OPS) of each block."""
    if not isinstance(key, str):
        raise InvalidArchitecture(f"a chain key is a string, not {type(key).__name__}")
    names = key.split(SEPARATOR)
    if len(names) != N_BLOCKS:
        raise InvalidArchitecture(f"expected {N_BLOCKS} blocks separated by {SEPARATOR!r}, got {len(names)}")
    for block, name in enumerate(names):
        if name not in OPS:
            raise InvalidArchitecture(f"unknown choice {name!r} in block {block}; known: {', '.join(OPS)}")
    return tuple(OPS.index(name) for name in names)


def key_of(ops: Sequence[int]) -> str:
    return SEPARATOR.join(OPS[op] for op in ops)


class ChainSpace(GraphEncodedSpace):
    """A chain of three convolution blocks (kernel 3/5, width 16/32/64 each; 216 architectures)."""

    name = "chain"
    op_names = (*OPS, "input", "output")
    input_shape = (3, 64, 64)
    key_format = f"{N_BLOCKS} blocks of {', '.join(OPS)} joined by {SEPARATOR!r}: k3_w16-k5_w32-k3_w64"

    def canonical(self, key: str) -> str:
        return key_of(parse(key))

    def size(self) -> int:
        return len(OPS) ** N_BLOCKS

    def enumerate(self) -> Iterator[str]:
        for ops in itertools.product(range(len(OPS)), repeat=N_BLOCKS):
            yield key_of(ops)

    def sample(self, n: int, seed: int) -> list[str]:
        check_sample_count(n, self.size())
        picks = np.random.default_rng(seed).choice(self.size(), size=n, replace=False)
        return [key_of([int(op) for op in np.unravel_index(int(i), (len(OPS),) * N_BLOCKS)]) for i in picks]

    def graph(self, key: str) -> ArchGraph:
        return chain_graph(parse(key), self.op_names.index("input"), self.op_names.index("output"))

    def build(self, key: str) -> torch.nn.Module:
        from torch import nn

        layers: list[nn.Module] = [nn.Conv2d(3, STEM_CHANNELS, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(STEM_CHANNELS), nn.ReLU()]
        channels = STEM_CHANNELS
        for op, stride in zip(parse(key), STRIDES):
            kernel, width = KERNELS[op // len(WIDTHS)], WIDTHS[op % len(WIDTHS)]
            layers += [nn.Conv2d(channels, width, kernel, stride=stride, padding=kernel // 2, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, N_CLASSES)]
        return nn.Sequential(*layers).eval()
