"""Pre-training the network ensemble on the reference devices' (architecture, latency) table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from predictor.network import Ensemble, MultiDeviceNet, safe_std

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class TrainConfig:
    members: int = 3
    hidden: int = 128
    depth: int = 3
    epochs: int = 25
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    #: reference devices held out in turn to choose the default sampler (0: no choice made, the
    #: default is the design sampler). Off by default: on held-out reference devices the choice
    #: validated per k scored no better than the design sampler at every k (`predictor.validation`)
    sampler_folds: int = 0


def train_ensemble(features: np.ndarray, log_ms: np.ndarray, config: TrainConfig, seed: int,
                   progress: ProgressCallback | None = None) -> Ensemble:
    """Fit `config.members` networks from `features` (n, d) to `log_ms` (n, n_ref, NaN where
    unmeasured), each from its own seed."""
    feature_mean = features.mean(axis=0)
    feature_std = safe_std(features).astype(np.float32)
    log_mean = np.nanmean(log_ms, axis=0)
    log_std = np.nanstd(log_ms, axis=0) + 1e-6
    x = torch.from_numpy(((features - feature_mean) / feature_std).astype(np.float32))
    y = torch.from_numpy(((log_ms - log_mean) / log_std).astype(np.float32))
    steps_per_member = config.epochs * max(1, -(-len(x) // config.batch_size))
    members = [
        _train_member(x, y, config, seed * 1000 + member, progress, member * steps_per_member,
                      config.members * steps_per_member)
        for member in range(config.members)
    ]
    return Ensemble(members, feature_mean, feature_std, log_mean, log_std)


def _train_member(x: torch.Tensor, y: torch.Tensor, config: TrainConfig, seed: int,
                  progress: ProgressCallback | None, step_offset: int, total_steps: int) -> MultiDeviceNet:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MultiDeviceNet(x.shape[1], y.shape[1], config.hidden, config.depth)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batches = max(1, -(-len(x) // config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.lr, total_steps=config.epochs * batches)
    observed = ~torch.isnan(y)
    targets = torch.nan_to_num(y)
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(config.batch_size):
            mask = observed[batch]
            loss = (((net(x[batch]) - targets[batch]) ** 2) * mask).sum() / mask.sum().clamp(min=1)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            step += 1
            if progress is not None:
                progress(step_offset + step, total_steps)
    return net.eval()
