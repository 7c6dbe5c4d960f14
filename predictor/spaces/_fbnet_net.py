"""The FBNet ImageNet network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._blocks import Residual, conv_bn, conv_bn_act, global_avg_pool
from .fbnet import BLOCK_SHAPES, STAGES

STEM_CHANNELS = 16
HEAD_CHANNELS = 1504
N_CLASSES = 1000


class ChannelShuffle(nn.Module):
    """Interleaves the channels of `groups` groups, so grouped 1x1 convolutions mix them."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Unpacking the shape into ints keeps the exported ONNX reshapes static.
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def inverted_residual(c_in: int, c_out: int, stride: int, kernel: int, expansion: int, groups: int) -> nn.Module:
    mid = c_in * expansion
    layers: list[nn.Module] = [conv_bn_act(c_in, mid, 1, nn.ReLU(), groups=groups)]
    if groups > 1:
        layers.append(ChannelShuffle(groups))
    layers += [
        conv_bn_act(mid, mid, kernel, nn.ReLU(), stride=stride, groups=mid),
        conv_bn(mid, c_out, 1, groups=groups),
    ]
    body = nn.Sequential(*layers)
    return Residual(body) if stride == 1 and c_in == c_out else body


def block(op: str, c_in: int, c_out: int, stride: int) -> nn.Module:
    if op == "skip":
        return nn.Identity() if stride == 1 and c_in == c_out else conv_bn(c_in, c_out, 1, stride)
    return inverted_residual(c_in, c_out, stride, *BLOCK_SHAPES[op])


def fbnet_network(ops: Sequence[str]) -> nn.Sequential:
    layers: list[nn.Module] = [conv_bn_act(3, STEM_CHANNELS, 3, nn.ReLU(), stride=2)]
    channels, remaining = STEM_CHANNELS, iter(ops)
    for c_out, n_blocks, first_stride in STAGES:
        for index in range(n_blocks):
            layers.append(block(next(remaining), channels, c_out, first_stride if index == 0 else 1))
            channels = c_out
    layers += [
        conv_bn_act(channels, HEAD_CHANNELS, 1, nn.ReLU()),
        global_avg_pool(),
        nn.Linear(HEAD_CHANNELS, N_CLASSES),
    ]
    return nn.Sequential(*layers)
