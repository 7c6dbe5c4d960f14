"""The OFA MobileNetV3 subnetwork of an architecture, as in the once-for-all reference code."""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import Residual, conv_bn, conv_bn_act, global_avg_pool
from .ofa import MAX_DEPTH, OFAArch

STEM_CHANNELS = 16
#: per stage: output channels, stride of the first block, activation, squeeze-and-excite
STAGES = (
    (24, 2, "relu", False),
    (40, 2, "relu", True),
    (80, 2, "h_swish", False),
    (112, 1, "h_swish", True),
    (160, 2, "h_swish", True),
)
FINAL_EXPAND_CHANNELS = 960
FEATURE_MIX_CHANNELS = 1280
N_CLASSES = 1000
CHANNEL_DIVISOR = 8


def make_divisible(value: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """The nearest multiple of `divisor`, rounded up when rounding would lose more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def activation(name: str) -> nn.Module:
    return nn.ReLU() if name == "relu" else nn.Hardswish()


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = make_divisible(channels // reduction)
        self.gate = nn.Sequential(
            global_avg_pool(flatten=False),
            nn.Conv2d(channels, mid, 1),
            nn.ReLU(),
            nn.Conv2d(mid, channels, 1),
            nn.Hardsigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def mb_conv(c_in: int, c_out: int, kernel: int, stride: int, expand: int, act: str, se: bool) -> nn.Module:
    """MobileNetV3 inverted bottleneck; the 1x1 expansion is left out when `expand` is 1."""
    mid = make_divisible(round(c_in * expand))
    layers: list[nn.Module] = [conv_bn_act(c_in, mid, 1, activation(act))] if expand != 1 else []
    layers.append(conv_bn_act(mid, mid, kernel, activation(act), stride=stride, groups=mid))
    if se:
        layers.append(SqueezeExcite(mid))
    layers.append(conv_bn(mid, c_out, 1))
    body = nn.Sequential(*layers)
    return Residual(body) if stride == 1 and c_in == c_out else body


def ofa_network(arch: OFAArch) -> nn.Sequential:
    layers: list[nn.Module] = [
        conv_bn_act(3, STEM_CHANNELS, 3, activation("h_swish"), stride=2),
        mb_conv(STEM_CHANNELS, STEM_CHANNELS, 3, 1, 1, "relu", se=False),
    ]
    channels = STEM_CHANNELS
    for stage, (c_out, first_stride, act, se) in enumerate(STAGES):
        for index in range(arch.d[stage]):
            block = stage * MAX_DEPTH + index
            stride = first_stride if index == 0 else 1
            layers.append(mb_conv(channels, c_out, arch.ks[block], stride, arch.e[block], act, se))
            channels = c_out
    layers += [
        conv_bn_act(channels, FINAL_EXPAND_CHANNELS, 1, activation("h_swish")),
        global_avg_pool(flatten=False),
        nn.Conv2d(FINAL_EXPAND_CHANNELS, FEATURE_MIX_CHANNELS, 1, bias=False),
        activation("h_swish"),
        nn.Flatten(),
        nn.Linear(FEATURE_MIX_CHANNELS, N_CLASSES),
    ]
    return nn.Sequential(*layers)
