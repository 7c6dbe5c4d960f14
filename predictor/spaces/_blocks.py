"""PyTorch layers shared by the spaces' networks (imported only when a network is built)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Bias-free 'same' convolution followed by batch norm."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    )


def conv_bn_act(
    c_in: int, c_out: int, kernel: int, act: nn.Module, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(*conv_bn(c_in, c_out, kernel, stride, groups), act)


class Residual(nn.Module):
    """x + body(x)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def global_avg_pool(flatten: bool = True) -> nn.Sequential:
    """Global average pooling to (N, C), or to (N, C, 1, 1) when `flatten` is False."""
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)]
    if flatten:
        layers.append(nn.Flatten())
    return nn.Sequential(*layers)
