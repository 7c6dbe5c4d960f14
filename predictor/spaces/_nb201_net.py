"""The NAS-Bench-201 CIFAR network, as in the benchmark's reference implementation."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch
from torch import nn

from ._blocks import conv_bn, global_avg_pool
from .nb201 import EDGES, OPS, OUTPUT_NODE, live_edges

STEM_CHANNELS = 16
CELLS_PER_STAGE = 5
N_CLASSES = 10


def relu_conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), *conv_bn(c_in, c_out, kernel, stride))


def edge_op(name: str, channels: int) -> nn.Module:
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return relu_conv_bn(channels, channels, 1)
    if name == "nor_conv_3x3":
        return relu_conv_bn(channels, channels, 3)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(f"no module for NB201 operation {name!r}")


class Cell(nn.Module):
    """node_j = sum of op(node_i) over the live edges i->j; a node without any is zero.

    Only edges on a path of non-`none` edges from the cell input to its output are built: the
    others are dead code or act on zeros, and a deployed network (like the reference devices'
    measurements) does not run them. The zeros are computed as `x * 0`, as in the benchmark's
    own code, rather than made a constant: an all-`none` network then still reads its input,
    so its ONNX keeps one."""

    def __init__(self, ops: Sequence[str], channels: int) -> None:
        super().__init__()
        live = live_edges(tuple(OPS.index(op) for op in ops))
        kept = [(edge, op) for edge, op, on in zip(EDGES, ops, live) if on]
        self.edges = [edge for edge, _ in kept]
        self.ops = nn.ModuleList(edge_op(op, channels) for _, op in kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for target in range(1, OUTPUT_NODE + 1):
            terms = [op(nodes[s]) for (s, t), op in zip(self.edges, self.ops) if t == target]
            nodes.append(functools.reduce(operator.add, terms) if terms else x * 0.0)
        return nodes[OUTPUT_NODE]


class ResidualReduction(nn.Module):
    """NB201's ResNet basic block between stages: halves the resolution, doubles the channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(relu_conv_bn(c_in, c_out, 3, stride=2), relu_conv_bn(c_out, c_out, 3))
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, stride=2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(x)


def nb201_network(ops: Sequence[str]) -> nn.Sequential:
    layers: list[nn.Module] = [*conv_bn(3, STEM_CHANNELS, 3)]
    channels = STEM_CHANNELS
    for stage in range(3):
        if stage > 0:
            layers.append(ResidualReduction(channels, channels * 2))
            channels *= 2
        layers.extend(Cell(ops, channels) for _ in range(CELLS_PER_STAGE))
    layers += [nn.BatchNorm2d(channels), nn.ReLU(), global_avg_pool(), nn.Linear(channels, N_CLASSES)]
    return nn.Sequential(*layers)
