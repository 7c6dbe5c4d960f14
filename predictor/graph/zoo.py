"""A model zoo for the `onnx` space: twelve standard ImageNet CNNs, random weights (the exporter's
fixed seed), exported to ONNX at a given input size. No reference table measured any of them, so
they check the graph-level predictor on what a deployment engineer would upload
(`benchmarks/model_zoo.py`).

The networks follow torchvision's definitions (block structure, channels, strides, kernel sizes,
squeeze-and-excite and activations as published): torchvision's own package cannot be used here,
as the release built for the pinned torch is linked against its CUDA build and fails to import
beside the CPU one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from predictor.export import export_module_onnx
from predictor.spaces._blocks import conv_bn, conv_bn_act, global_avg_pool

N_CLASSES = 1000
#: the usual ImageNet input and a smaller one mobile deployments use
RESOLUTIONS = (224, 160)
Act = Callable[[], nn.Module]


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: the nearest multiple of `divisor`, never 10 % below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcite(nn.Module):
    """x * gate(fc(act(fc(pool(x))))): the channel attention of MobileNetV3, EfficientNet, RegNetY."""

    def __init__(self, channels: int, squeeze: int, act: Act = nn.ReLU, gate: Act = nn.Sigmoid) -> None:
        super().__init__()
        self.scale = nn.Sequential(global_avg_pool(flatten=False), nn.Conv2d(channels, squeeze, 1), act(),
                                   nn.Conv2d(squeeze, channels, 1), gate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x)


class Block(nn.Module):
    """body(x), plus x (or shortcut(x)) when the block is residual, then `after`."""

    def __init__(self, body: nn.Module, residual: bool, shortcut: nn.Module | None = None,
                 after: nn.Module | None = None) -> None:
        super().__init__()
        self.body, self.residual = body, residual
        self.shortcut = shortcut or nn.Identity()
        self.after = after or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.after(y + self.shortcut(x) if self.residual else y)


def classifier(channels: int, hidden: int | None = None, act: Act = nn.Hardswish) -> nn.Sequential:
    if hidden is None:
        return nn.Sequential(global_avg_pool(), nn.Dropout(0.2), nn.Linear(channels, N_CLASSES))
    return nn.Sequential(global_avg_pool(), nn.Linear(channels, hidden), act(), nn.Dropout(0.2),
                         nn.Linear(hidden, N_CLASSES))


# ---- ResNet (He et al. 2016; torchvision's v1.5: the bottleneck's stride on its 3x3) ------------

def _projection(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    return conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None


def resnet(depths: Sequence[int], bottleneck: bool) -> nn.Module:
    expansion = 4 if bottleneck else 1
    layers: list[nn.Module] = [conv_bn_act(3, 64, 7, nn.ReLU(), stride=2), nn.MaxPool2d(3, 2, 1)]
    c_in = 64
    for stage, depth in enumerate(depths):
        width = 64 * 2**stage
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            c_out = width * expansion
            if bottleneck:
                body = nn.Sequential(conv_bn_act(c_in, width, 1, nn.ReLU()),
                                     conv_bn_act(width, width, 3, nn.ReLU(), stride=stride), conv_bn(width, c_out, 1))
            else:
                body = nn.Sequential(conv_bn_act(c_in, width, 3, nn.ReLU(), stride=stride), conv_bn(width, c_out, 3))
            layers.append(Block(body, True, _projection(c_in, c_out, stride), nn.ReLU()))
            c_in = c_out
    return nn.Sequential(*layers, global_avg_pool(), nn.Linear(c_in, N_CLASSES))


# ---- inverted residuals: MobileNetV2, MobileNetV3, EfficientNet, MnasNet ------------------------

def inverted_residual(c_in: int, expanded: int, c_out: int, kernel: int, stride: int, act: Act,
                      se: nn.Module | None = None) -> Block:
    """1x1 expansion (left out when it would not widen), depthwise kxk, squeeze-excite, 1x1 projection."""
    layers: list[nn.Module] = [conv_bn_act(c_in, expanded, 1, act())] if expanded != c_in else []
    layers.append(conv_bn_act(expanded, expanded, kernel, act(), stride=stride, groups=expanded))
    if se is not None:
        layers.append(se)
    layers.append(conv_bn(expanded, c_out, 1))
    return Block(nn.Sequential(*layers), stride == 1 and c_in == c_out)


def mobilenet_v2() -> nn.Module:
    # (expansion, channels, repeats, stride) of Sandler et al. 2018, table 2
    settings = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))
    layers: list[nn.Module] = [conv_bn_act(3, 32, 3, nn.ReLU6(), stride=2)]
    c_in = 32
    for expansion, c_out, repeats, stride in settings:
        for i in range(repeats):
            layers.append(inverted_residual(c_in, c_in * expansion, c_out, 3, stride if i == 0 else 1, nn.ReLU6))
            c_in = c_out
    return nn.Sequential(*layers, conv_bn_act(c_in, 1280, 1, nn.ReLU6()), classifier(1280))


#: MobileNetV3 blocks (Howard et al. 2019, tables 1 and 2): kernel, expanded, out, SE, hard-swish, stride
_V3_LARGE = ((3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
             (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
             (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
             (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
             (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1))
_V3_SMALL = ((3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
             (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
             (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
             (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1))


def mobilenet_v3(blocks: Sequence[tuple[int, int, int, bool, bool, int]], hidden: int) -> nn.Module:
    layers: list[nn.Module] = [conv_bn_act(3, 16, 3, nn.Hardswish(), stride=2)]
    c_in = 16
    for kernel, expanded, c_out, se, hard_swish, stride in blocks:
        excite = SqueezeExcite(expanded, make_divisible(expanded // 4), nn.ReLU, nn.Hardsigmoid) if se else None
        layers.append(inverted_residual(c_in, expanded, c_out, kernel, stride,
                                        nn.Hardswish if hard_swish else nn.ReLU, excite))
        c_in = c_out
    return nn.Sequential(*layers, conv_bn_act(c_in, 6 * c_in, 1, nn.Hardswish()), classifier(6 * c_in, hidden))


def efficientnet_b0() -> nn.Module:
    # (expansion, kernel, stride, channels, repeats) of Tan & Le 2019, table 1
    stages = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
    layers: list[nn.Module] = [conv_bn_act(3, 32, 3, nn.SiLU(), stride=2)]
    c_in = 32
    for expansion, kernel, stride, c_out, repeats in stages:
        for i in range(repeats):
            expanded = make_divisible(c_in * expansion)
            excite = SqueezeExcite(expanded, max(1, c_in // 4), nn.SiLU, nn.Sigmoid)
            layers.append(inverted_residual(c_in, expanded, c_out, kernel, stride if i == 0 else 1, nn.SiLU, excite))
            c_in = c_out
    return nn.Sequential(*layers, conv_bn_act(c_in, 1280, 1, nn.SiLU()), classifier(1280))


def mnasnet1_0() -> nn.Module:
    # (channels, kernel, stride, expansion, repeats) of Tan et al. 2019 (MnasNet-B1, torchvision's mnasnet1_0)
    stacks = ((24, 3, 2, 3, 3), (40, 5, 2, 3, 3), (80, 5, 2, 6, 3), (96, 3, 1, 6, 2), (192, 5, 2, 6, 4),
              (320, 3, 1, 6, 1))
    layers: list[nn.Module] = [conv_bn_act(3, 32, 3, nn.ReLU(), stride=2),
                               conv_bn_act(32, 32, 3, nn.ReLU(), groups=32), conv_bn(32, 16, 1)]
    c_in = 16
    for c_out, kernel, stride, expansion, repeats in stacks:
        for i in range(repeats):
            layers.append(inverted_residual(c_in, c_in * expansion, c_out, kernel, stride if i == 0 else 1, nn.ReLU))
            c_in = c_out
    return nn.Sequential(*layers, conv_bn_act(c_in, 1280, 1, nn.ReLU()), classifier(1280))


# ---- ShuffleNetV2 (Ma et al. 2018), SqueezeNet 1.1 (Iandola et al. 2016) -----------------------

class ShuffleUnit(nn.Module):
    """Split the channels (or, when downsampling, feed both branches), concatenate, shuffle two groups."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        half = c_out // 2
        self.stride, self.branch_width = stride, half
        self.left = nn.Sequential(conv_bn(c_in, c_in, 3, stride, groups=c_in), conv_bn_act(c_in, half, 1, nn.ReLU())) \
            if stride == 2 else nn.Identity()
        right_in = c_in if stride == 2 else half
        self.right = nn.Sequential(conv_bn_act(right_in, half, 1, nn.ReLU()),
                                   conv_bn(half, half, 3, stride, groups=half), conv_bn_act(half, half, 1, nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's x.chunk(2) and channels // 2 export as shape arithmetic (Div, Mod) that ONNX
        # shape inference cannot follow; constant slice bounds and group sizes fold away
        if self.stride == 1:
            y = torch.cat((x[:, : self.branch_width], self.right(x[:, self.branch_width :])), dim=1)
        else:
            y = torch.cat((self.left(x), self.right(x)), dim=1)
        n, _, h, w = y.shape
        return y.view(n, 2, self.branch_width, h, w).transpose(1, 2).reshape(n, 2 * self.branch_width, h, w)


def shufflenet_v2_x1_0() -> nn.Module:
    layers: list[nn.Module] = [conv_bn_act(3, 24, 3, nn.ReLU(), stride=2), nn.MaxPool2d(3, 2, 1)]
    c_in = 24
    for c_out, repeats in ((116, 4), (232, 8), (464, 4)):
        for i in range(repeats):
            layers.append(ShuffleUnit(c_in, c_out, 2 if i == 0 else 1))
            c_in = c_out
    return nn.Sequential(*layers, conv_bn_act(c_in, 1024, 1, nn.ReLU()), global_avg_pool(), nn.Linear(1024, N_CLASSES))


class Fire(nn.Module):
    def __init__(self, c_in: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(c_in, squeeze, 1), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat((self.expand1(s), self.expand3(s)), dim=1)


def squeezenet1_1() -> nn.Module:
    def pool() -> nn.Module:
        return nn.MaxPool2d(3, 2, ceil_mode=True)

    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 2), nn.ReLU(), pool(), Fire(64, 16, 64), Fire(128, 16, 64), pool(),
        Fire(128, 32, 128), Fire(256, 32, 128), pool(), Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256),
        Fire(512, 64, 256), nn.Dropout(0.5), nn.Conv2d(512, N_CLASSES, 1), nn.ReLU(), global_avg_pool(),
    )


# ---- RegNet (Radosavovic et al. 2020): stage widths and depths from the quantised linear rule ---

def regnet_stages(depth: int, w_0: int, w_a: float, w_m: float, group_width: int) -> list[tuple[int, int, int]]:
    """(width, depth, group width) per stage, as torchvision's BlockParams.from_init_params computes them."""
    block_widths = []
    for i in range(depth):
        capacity = round(math.log((i * w_a + w_0) / w_0) / math.log(w_m))
        block_widths.append(int(round(w_0 * w_m**capacity / 8) * 8))
    stages: list[list[int]] = []
    for width in block_widths:
        if stages and stages[-1][0] == width:
            stages[-1][1] += 1
        else:
            stages.append([width, 1])
    # group widths no wider than the stage, stage widths a multiple of their group width
    out = []
    for width, count in stages:
        group = min(group_width, width)
        out.append((make_divisible(width, group), count, group))
    return out


def regnet(depth: int, w_0: int, w_a: float, w_m: float, group_width: int, se: bool) -> nn.Module:
    layers: list[nn.Module] = [conv_bn_act(3, 32, 3, nn.ReLU(), stride=2)]
    c_in = 32
    for width, count, group in regnet_stages(depth, w_0, w_a, w_m, group_width):
        for i in range(count):
            stride = 2 if i == 0 else 1
            body: list[nn.Module] = [conv_bn_act(c_in, width, 1, nn.ReLU()),
                                     conv_bn_act(width, width, 3, nn.ReLU(), stride=stride, groups=width // group)]
            if se:
                body.append(SqueezeExcite(width, int(round(0.25 * c_in))))
            body.append(conv_bn(width, width, 1))
            layers.append(Block(nn.Sequential(*body), True, _projection(c_in, width, stride), nn.ReLU()))
            c_in = width
    return nn.Sequential(*layers, global_avg_pool(), nn.Linear(c_in, N_CLASSES))


#: name -> builder, named as torchvision names them
BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: resnet((2, 2, 2, 2), bottleneck=False),
    "resnet34": lambda: resnet((3, 4, 6, 3), bottleneck=False),
    "resnet50": lambda: resnet((3, 4, 6, 3), bottleneck=True),
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": lambda: mobilenet_v3(_V3_SMALL, 1024),
    "mobilenet_v3_large": lambda: mobilenet_v3(_V3_LARGE, 1280),
    "efficientnet_b0": efficientnet_b0,
    "mnasnet1_0": mnasnet1_0,
    "shufflenet_v2_x1_0": shufflenet_v2_x1_0,
    "squeezenet1_1": squeezenet1_1,
    "regnet_x_400mf": lambda: regnet(22, 24, 24.48, 2.54, 16, se=False),
    "regnet_y_400mf": lambda: regnet(16, 48, 27.89, 2.09, 8, se=True),
}
ZOO = tuple(BUILDERS)


@dataclass(frozen=True)
class ZooModel:
    name: str
    resolution: int

    @property
    def label(self) -> str:
        return f"{self.name}@{self.resolution}"

    def build(self) -> nn.Module:
        return BUILDERS[self.name]()

    def export(self) -> bytes:
        """The ONNX model (batch 1, static shapes, seeded weights): byte-identical for a given torch."""
        return export_module_onnx(self.build, (3, self.resolution, self.resolution))


def zoo(names: Sequence[str] = ZOO, resolutions: Sequence[int] = RESOLUTIONS) -> list[ZooModel]:
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        raise ValueError(f"not in the zoo: {', '.join(unknown)} (it has {', '.join(ZOO)})")
    return [ZooModel(name, resolution) for name in names for resolution in resolutions]
