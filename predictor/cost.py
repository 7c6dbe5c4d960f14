"""FLOPs (multiply-accumulates of Conv2d and Linear layers) and parameter counts per architecture.

`analytic_cost` works them out from the key and the macro-architecture, fast enough for whole
spaces; `hooked_cost` counts them on the built PyTorch module, and the tests check that the two
agree. Parameters are every parameter of the module (convolutions, batch norms, classifier).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np

from predictor.spaces import SearchSpace
from predictor.spaces import fbnet as fb
from predictor.spaces import nb201 as nb

Cost = tuple[int, int]  # (MACs, parameters)
#: trailing columns of `summary_features` that are costs (log MACs, log parameters)
N_COST_DESCRIPTORS = 2


def _conv(c_in: int, c_out: int, kernel: int, out_hw: int, groups: int = 1, bn: bool = True) -> Cost:
    weights = c_out * (c_in // groups) * kernel * kernel
    return weights * out_hw * out_hw, weights + (2 * c_out if bn else 0)


def _add(*costs: Cost) -> Cost:
    return sum(c[0] for c in costs), sum(c[1] for c in costs)


# ---- NAS-Bench-201 --------------------------------------------------------------------------------

_NB201_STAGES = ((16, 32), (32, 16), (64, 8))  # (channels, resolution) of each stage's cells


@cache
def _nb201_cost_of_convs(n1: int, n3: int) -> Cost:
    """The cost depends only on how many live 1x1 and 3x3 convolutions the cell has."""
    from predictor.spaces._nb201_net import CELLS_PER_STAGE, N_CLASSES, STEM_CHANNELS

    parts = [_conv(3, STEM_CHANNELS, 3, 32)]
    for stage, (c, hw) in enumerate(_NB201_STAGES):
        if stage > 0:  # the residual reduction block from the previous stage
            c_in = c // 2
            parts += [_conv(c_in, c, 3, hw), _conv(c, c, 3, hw), _conv(c_in, c, 1, hw, bn=False)]
        cell = _add(*[_conv(c, c, 1, hw)] * n1, *[_conv(c, c, 3, hw)] * n3)
        parts += [cell] * CELLS_PER_STAGE
    c_last = _NB201_STAGES[-1][0]
    parts += [(0, 2 * c_last), (c_last * N_CLASSES, c_last * N_CLASSES + N_CLASSES)]  # BN, classifier
    return _add(*parts)


# ---- FBNet ------------------------------------------------------------------------------------------


def _fbnet_block(op: str, c_in: int, c_out: int, stride: int, hw_in: int) -> Cost:
    hw_out = hw_in // stride
    if op == "skip":
        return (0, 0) if stride == 1 and c_in == c_out else _conv(c_in, c_out, 1, hw_out)
    kernel, expansion, groups = fb.BLOCK_SHAPES[op]
    mid = c_in * expansion
    return _add(_conv(c_in, mid, 1, hw_in, groups), _conv(mid, mid, kernel, hw_out, mid),
                _conv(mid, c_out, 1, hw_out, groups))


def _fbnet_layout() -> list[tuple[int, int, int, int]]:
    """(c_in, c_out, stride, input resolution) of each searchable block."""
    from predictor.spaces._fbnet_net import STEM_CHANNELS

    layout, channels, hw = [], STEM_CHANNELS, 112
    for c_out, n_blocks, first_stride in fb.STAGES:
        for index in range(n_blocks):
            stride = first_stride if index == 0 else 1
            layout.append((channels, c_out, stride, hw))
            channels, hw = c_out, hw // stride
    return layout


def _fbnet_costs() -> tuple[Cost, np.ndarray, np.ndarray]:
    """Fixed cost (stem, head), and per (block, op) MACs and parameters."""
    from predictor.spaces._fbnet_net import HEAD_CHANNELS, N_CLASSES, STEM_CHANNELS

    layout = _fbnet_layout()
    macs = np.zeros((len(layout), len(fb.OPS)), dtype=np.int64)
    params = np.zeros_like(macs)
    for b, (c_in, c_out, stride, hw) in enumerate(layout):
        for o, op in enumerate(fb.OPS):
            macs[b, o], params[b, o] = _fbnet_block(op, c_in, c_out, stride, hw)
    c_last, hw_last = layout[-1][1], layout[-1][3] // layout[-1][2]
    fixed = _add(_conv(3, STEM_CHANNELS, 3, 112), _conv(c_last, HEAD_CHANNELS, 1, hw_last),
                 (HEAD_CHANNELS * N_CLASSES, HEAD_CHANNELS * N_CLASSES + N_CLASSES))
    return fixed, macs, params


def nb201_cost(space: nb.NB201Space, keys: Sequence[str], dead_code: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`NB201Space.analytic_cost`; with `dead_code`, `NB201Space.written_cost` (the convolutions
    on edges no input-output path uses count too)."""
    ops, live = space.op_table(keys)
    counted = np.ones_like(live) if dead_code else live
    n1 = ((ops == nb.OPS.index("nor_conv_1x1")) & counted).sum(axis=1).tolist()
    n3 = ((ops == nb.OPS.index("nor_conv_3x3")) & counted).sum(axis=1).tolist()
    costs = [_nb201_cost_of_convs(a, b) for a, b in zip(n1, n3)]
    return np.asarray([c[0] for c in costs], dtype=np.int64), np.asarray([c[1] for c in costs], dtype=np.int64)


def fbnet_cost(space: fb.FBNetSpace, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`FBNetSpace.analytic_cost`."""
    (fixed_macs, fixed_params), macs, params = _fbnet_costs()
    ops = np.asarray([space.op_vec(key) for key in keys], dtype=np.int64).reshape(len(keys), fb.N_BLOCKS)
    blocks = np.arange(fb.N_BLOCKS)
    return fixed_macs + macs[blocks, ops].sum(axis=1), fixed_params + params[blocks, ops].sum(axis=1)


# ---- public -----------------------------------------------------------------------------------------


def analytic_cost(space: SearchSpace, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(MACs, parameters) of each key, as int64 arrays (`SearchSpace.analytic_cost`)."""
    cost = space.analytic_cost(keys)
    if cost is None:
        raise ValueError(f"no analytic FLOPs for the {space.name} space")
    return cost


def summary_features(space: SearchSpace, keys: Sequence[str], features: np.ndarray,
                     width: int | None = None) -> np.ndarray:
    """Whole-architecture descriptors: the first `space.summary_dim` non-one-hot columns of
    `features` plus log MACs and log parameters of the keys as written (`written_cost`) where the
    space has an analytic count. Few enough to fit from a handful of samples. `width`: how many
    descriptors in all, where a predictor was fitted with another count (older ones took every
    non-one-hot column)."""
    cost = space.written_cost(keys)
    n_cost = 0 if cost is None else N_COST_DESCRIPTORS
    n_summary = space.summary_dim if width is None else width - n_cost
    tail = features[:, space.onehot_dim:][:, :n_summary].astype(np.float64)
    if cost is None:
        return tail
    macs, params = cost
    return np.hstack([tail, np.log(macs.astype(np.float64))[:, None], np.log(params.astype(np.float64))[:, None]])


def hooked_cost(space: SearchSpace, key: str) -> Cost:
    """(MACs, parameters) counted on the built module with forward hooks on Conv2d and Linear."""
    import torch
    from torch import nn

    model = space.build(key)
    total = [0]

    def conv_hook(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        total[0] += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        total[0] += module.in_features * module.out_features * (output.numel() // output.shape[-1] // output.shape[0])

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    with torch.inference_mode():
        model(space.example_input(key))
    for handle in handles:
        handle.remove()
    return total[0], sum(p.numel() for p in model.parameters())
