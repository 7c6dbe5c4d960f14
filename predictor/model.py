"""The latency predictor: a multi-device network pre-trained on reference devices, adapted by ridge.

Pre-training fits an ensemble of MLPs mapping an architecture's encoding to its standardised
log-latency on every reference device at once. A new device's log-latency is then a linear
function of two blocks, fitted on its few measured samples: the reference devices' predicted
latencies (how known hardware sees the architecture), led by an unpenalised prior that weights
the reference devices by their correlation with the samples, and a few whole-architecture
descriptors (log MACs, log parameters, op shares: what no reference device captures, e.g. a
device bound by kernel launches rather than arithmetic). Each block has its own ridge penalty,
chosen by leave-one-out error on the samples; bootstrapped fits give the uncertainty, and their
median the prediction (bagging: on 28 held-out reference devices of tasks F0-F2, F4, N0, N1
and N3 it ranked better than the single fit on all samples did, mean rho +0.001 at k=20 and
+0.007 at k=10, ahead on 21 and 20 of the 28).

Pre-training also settles which sampler should pick a new device's samples, by validation on
the reference devices alone: leave one reference device out, pre-train on the others, adapt to
k samples of the held-out device chosen by each candidate sampler, score Spearman's rho on its
remaining architectures (see `predictor.validation`). The winner per sample count is stored as
`preferred_samplers`, and `get_sampler("default")` follows it. No target device takes part in
pre-training or in that choice. Longer training (100 epochs, 5 held-out devices of task F0)
and a larger ensemble (6 members, one held-out device of F4) were tried the same way and did
not help there (rho -0.003 and -0.001 at k=20), so `TrainConfig` keeps its defaults.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from os import PathLike
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from predictor.cost import ANALYTIC_SPACES, N_COST_DESCRIPTORS, summary_features
from predictor.reference import LatencyTable, Row
from predictor.spaces import SearchSpace, get_space

CHECKPOINT_FORMAT = "latfarm.predictor/3"
#: older formats `load` still reads (they carry no validated sampler preference)
READABLE_FORMATS = ("latfarm.predictor/2", CHECKPOINT_FORMAT)
ProgressCallback = Callable[[int, int], None]


class MultiDeviceNet(nn.Module):
    """Encoding -> standardised log-latency on each reference device."""

    def __init__(self, in_dim: int, n_devices: int, hidden: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.Linear(hidden, n_devices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.trunk(x))


@dataclass(frozen=True)
class TrainConfig:
    members: int = 3
    hidden: int = 128
    depth: int = 3
    epochs: int = 25
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    #: reference devices held out in turn to choose the default sampler (0: no choice made)
    sampler_folds: int = 5


#: leave-one-out candidates for the penalty of each block of the adaptation; an infinite
#: penalty leaves the block out
PRIOR_PENALTIES = (0.0, float("inf"))
REFERENCE_PENALTIES = (*(float(a) for a in np.logspace(-2, 3, 6)), float("inf"))
DESCRIPTOR_PENALTIES = (*(float(a) for a in np.logspace(-1, 4, 6)), float("inf"))
COST_PENALTIES = (0.0, 1.0, 10.0, float("inf"))
#: how sharply the prior favours the reference devices best correlated with the samples
SIMILARITY_SHARPNESS = 20.0


@dataclass(frozen=True)
class DeviceFit:
    """A target device as bootstrapped ridge fits on [reference predictions, descriptors]."""

    name: str
    coef: np.ndarray  # (n_boot, n_reference + n_descriptors)
    intercept: np.ndarray  # (n_boot,)
    penalties: tuple[float, ...]  # per block: prior, references, descriptors, costs (if any)
    samples: dict[str, float]


class LatencyPredictor:
    def __init__(
        self,
        space: SearchSpace,
        reference_devices: list[str],
        members: list[MultiDeviceNet],
        feature_mean: np.ndarray,
        feature_std: np.ndarray,
        log_mean: np.ndarray,
        log_std: np.ndarray,
        descriptor_mean: np.ndarray,
        descriptor_std: np.ndarray,
        config: TrainConfig,
        target: DeviceFit | None = None,
        preferred_samplers: Mapping[int, str] | None = None,
        sampler_scores: Mapping[str, Mapping[int, float]] | None = None,
    ) -> None:
        self.space = space
        self.reference_devices = reference_devices
        self.members = members
        self.feature_mean = feature_mean
        self.feature_std = feature_std
        self.log_mean = log_mean
        self.log_std = log_std
        self.descriptor_mean = descriptor_mean
        self.descriptor_std = descriptor_std
        self.config = config
        self.target = target
        #: validated sample count -> the sampler that adapted best at it on held-out reference devices
        self.preferred_samplers = {int(k): str(v) for k, v in (preferred_samplers or {}).items()}
        #: sampler -> validated sample count -> mean Spearman rho on held-out reference devices
        self.sampler_scores = {str(n): {int(k): float(v) for k, v in per_k.items()}
                               for n, per_k in (sampler_scores or {}).items()}

    # ---- pre-training -----------------------------------------------------------------------

    @classmethod
    def pretrain(
        cls,
        space: SearchSpace | str,
        table: Iterable[Row] | LatencyTable,
        *,
        seed: int = 0,
        config: TrainConfig = TrainConfig(),
        progress: ProgressCallback | None = None,
    ) -> LatencyPredictor:
        """Fit a base predictor on (arch key, device, ms) rows of reference devices only, and
        choose its default sampler by leave-one-reference-device-out validation
        (`config.sampler_folds` folds; see `predictor.validation`)."""
        from predictor.validation import held_out_devices, preferred_samplers, validate_samplers

        space = get_space(space) if isinstance(space, str) else space
        if not isinstance(table, LatencyTable):
            table = LatencyTable.from_rows(space, table)
        n_folds = len(held_out_devices(table.devices, config.sampler_folds, seed))
        # the folds are pre-trained like the base (a one-member ensemble ranked the samplers
        # differently in validation), so pre-training costs (1 + folds) times as much
        fit_config = replace(config, sampler_folds=0)
        fits = [0]

        def fit(fit_table: LatencyTable, fit_seed: int) -> LatencyPredictor:
            offset = fits[0]
            fits[0] += 1
            fit_progress = None
            if progress is not None:
                def fit_progress(done: int, total: int) -> None:
                    progress(offset * total + done, (n_folds + 1) * total)
            return cls._fit(space, fit_table, seed=fit_seed, config=fit_config, progress=fit_progress)

        base = fit(table, seed)
        scores = validate_samplers(space, table, fit, folds=config.sampler_folds, seed=seed)
        base.config = config
        base.preferred_samplers = preferred_samplers(scores)
        base.sampler_scores = scores
        return base

    @classmethod
    def _fit(cls, space: SearchSpace, table: LatencyTable, *, seed: int, config: TrainConfig,
             progress: ProgressCallback | None) -> LatencyPredictor:
        """The networks of a base predictor on `table` (no sampler validation)."""
        features = space.features(table.keys).astype(np.float32)
        feature_mean = features.mean(axis=0)
        # a feature constant in training (e.g. "connected" when only connected cells were
        # measured) must stay finite for architectures where it differs
        feature_std = _safe_std(features).astype(np.float32)
        descriptors = summary_features(space, table.keys, features)
        descriptor_mean, descriptor_std = descriptors.mean(axis=0), _safe_std(descriptors)
        log_mean = np.nanmean(table.log_ms, axis=0)
        log_std = np.nanstd(table.log_ms, axis=0) + 1e-6
        x = torch.from_numpy((features - feature_mean) / feature_std)
        y = torch.from_numpy(((table.log_ms - log_mean) / log_std).astype(np.float32))
        steps_per_member = config.epochs * max(1, -(-len(x) // config.batch_size))
        members = []
        for member in range(config.members):
            members.append(
                _train_member(x, y, config, seed * 1000 + member, progress, member * steps_per_member,
                              config.members * steps_per_member)
            )
        return cls(space, table.devices, members, feature_mean, feature_std, log_mean, log_std, descriptor_mean,
                   descriptor_std, config)

    # ---- inference --------------------------------------------------------------------------

    def reference_log_ms(self, keys: Sequence[str], features: np.ndarray | None = None) -> np.ndarray:
        """Predicted standardised log-latency on every reference device: (members, len(keys), n_ref)."""
        if features is None:
            features = self.space.features([self.space.canonical(k) for k in keys])
        x = torch.from_numpy(((features - self.feature_mean) / self.feature_std).astype(np.float32))
        with torch.inference_mode():
            return np.stack([member(x).numpy() for member in self.members])

    def descriptors(self, keys: Sequence[str]) -> np.ndarray:
        """Everything the adaptation regresses on, per key: what samplers should spread over."""
        return self._design(keys)

    def _design(self, keys: Sequence[str]) -> np.ndarray:
        """Regressors of the adaptation: [reference predictions (ensemble mean), descriptors]."""
        keys = [self.space.canonical(k) for k in keys]
        features = self.space.features(keys)
        descriptors = (summary_features(self.space, keys, features) - self.descriptor_mean) / self.descriptor_std
        return np.hstack([self.reference_log_ms(keys, features).mean(axis=0), descriptors])

    def embed(self, keys: Sequence[str]) -> np.ndarray:
        """The architectures as seen by the reference devices (ensemble mean), for samplers."""
        return self.reference_log_ms(keys).mean(axis=0)

    def predict(self, keys: Sequence[str], device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Latency (ms) and its uncertainty (ms, one standard deviation) for each key.

        An adapted predictor answers for its target device; a base predictor for any of its
        reference devices, named by `device`.
        """
        if len(keys) == 0:
            return np.zeros(0), np.zeros(0)
        if device is None or (self.target is not None and device == self.target.name):
            if self.target is None:
                raise ValueError("a base predictor needs `device`: one of its reference devices")
            fits = self._design(keys) @ self.target.coef.T + self.target.intercept  # (n, n_boot)
            # bagged: the median over the bootstrap fits (the fit on all samples among them), which
            # one wild bootstrap fit cannot drag; see `bagged_centre`
            centre = bagged_centre(fits)
        else:
            if device not in self.reference_devices:
                raise ValueError(f"{device!r} is not a reference device of this predictor")
            col = self.reference_devices.index(device)
            standardised = self.reference_log_ms(keys)[:, :, col]
            fits = (standardised * self.log_std[col] + self.log_mean[col]).T  # (n, members)
            centre = fits.mean(axis=1)
        # in log space; the spread of the fits gives the uncertainty in ms (delta method)
        ms = np.exp(centre)
        return ms, ms * fits.std(axis=1)

    # ---- few-shot adaptation ----------------------------------------------------------------

    def adapt(self, samples: Mapping[str, float], name: str = "target", *, seed: int = 0,
              n_boot: int = 64) -> LatencyPredictor:
        """A predictor for a new device from a few measured {arch key: ms} samples."""
        if len(samples) < 2:
            raise ValueError("adaptation needs at least 2 measured architectures")
        keys = [self.space.canonical(k) for k in samples]
        y = np.log(np.asarray([samples[k] for k in samples], dtype=np.float64))
        if not np.all(np.isfinite(y)):
            raise ValueError("sample latencies must be positive finite numbers")
        n_ref = len(self.reference_devices)
        x = self._design(keys)
        weights = _similarity_weights(x[:, :n_ref], y)
        # the prior (the reference devices most like this one) enters unpenalised; the ridge
        # blocks then only model what the prior gets wrong
        augmented = np.hstack([x[:, :n_ref] @ weights[:, None], x])
        n_cost = N_COST_DESCRIPTORS if self.space.name in ANALYTIC_SPACES else 0
        blocks = [(1, PRIOR_PENALTIES), (n_ref, REFERENCE_PENALTIES),
                  (x.shape[1] - n_ref - n_cost, DESCRIPTOR_PENALTIES), (n_cost, COST_PENALTIES)]
        penalty, block_penalties = _loo_penalty(augmented, y, [b for b in blocks if b[0]])
        rng = np.random.default_rng(seed)
        fits = [_ridge(augmented, y, penalty)]
        for _ in range(n_boot - 1):
            pick = rng.integers(0, len(y), len(y))
            fits.append(_ridge(augmented[pick], y[pick], penalty))
        coef = np.stack([c[1:] for c, _ in fits])
        coef[:, :n_ref] += np.outer([c[0] for c, _ in fits], weights)
        intercept = np.asarray([b for _, b in fits])
        fit = DeviceFit(name, coef, intercept, block_penalties, dict(zip(keys, map(float, np.exp(y)))))
        return LatencyPredictor(
            self.space, self.reference_devices, self.members, self.feature_mean, self.feature_std,
            self.log_mean, self.log_std, self.descriptor_mean, self.descriptor_std, self.config, fit,
            self.preferred_samplers, self.sampler_scores,
        )

    # ---- persistence ------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        target = None
        if self.target is not None:
            target = {
                "name": self.target.name,
                "coef": torch.from_numpy(self.target.coef),
                "intercept": torch.from_numpy(self.target.intercept),
                "penalties": list(self.target.penalties),
                "samples": self.target.samples,
            }
        return {
            "format": CHECKPOINT_FORMAT,
            "space": self.space.name,
            "reference_devices": self.reference_devices,
            "config": self.config.__dict__,
            "feature_mean": torch.from_numpy(self.feature_mean),
            "feature_std": torch.from_numpy(self.feature_std),
            "log_mean": torch.from_numpy(np.asarray(self.log_mean, dtype=np.float32)),
            "log_std": torch.from_numpy(np.asarray(self.log_std, dtype=np.float32)),
            "descriptor_mean": torch.from_numpy(self.descriptor_mean),
            "descriptor_std": torch.from_numpy(self.descriptor_std),
            "members": [member.state_dict() for member in self.members],
            "target": target,
            "preferred_samplers": dict(self.preferred_samplers),
            "sampler_scores": {name: dict(per_k) for name, per_k in self.sampler_scores.items()},
        }

    def save(self, file: str | PathLike[str] | BinaryIO) -> None:
        torch.save(self.state(), file)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.save(buffer)
        return buffer.getvalue()

    @classmethod
    def load(cls, file: str | PathLike[str] | BinaryIO | bytes) -> LatencyPredictor:
        """Load a checkpoint; only tensors and plain data are unpickled (`weights_only=True`)."""
        if isinstance(file, bytes):
            file = io.BytesIO(file)
        state = torch.load(file, weights_only=True)
        if state.get("format") not in READABLE_FORMATS:
            raise ValueError(f"not a latfarm predictor checkpoint (format {state.get('format')!r})")
        space = get_space(state["space"])
        config = TrainConfig(**state["config"])
        members = []
        for member_state in state["members"]:
            in_dim = member_state["trunk.0.weight"].shape[1]
            member = MultiDeviceNet(in_dim, len(state["reference_devices"]), config.hidden, config.depth)
            member.load_state_dict(member_state)
            members.append(member.eval())
        target = state["target"]
        fit = None
        if target is not None:
            fit = DeviceFit(target["name"], target["coef"].numpy(), target["intercept"].numpy(),
                            tuple(target["penalties"]), dict(target["samples"]))
        return cls(space, list(state["reference_devices"]), members, state["feature_mean"].numpy(),
                   state["feature_std"].numpy(), state["log_mean"].numpy(), state["log_std"].numpy(),
                   state["descriptor_mean"].numpy(), state["descriptor_std"].numpy(), config, fit,
                   state.get("preferred_samplers"), state.get("sampler_scores"))


def bagged_centre(fits: np.ndarray) -> np.ndarray:
    """The prediction from (n, n_boot) bootstrapped log-latency fits: their median per row."""
    return np.median(fits, axis=1)


def _safe_std(values: np.ndarray) -> np.ndarray:
    """Column standard deviations, 1 where a column (nearly) never varies: a feature constant in
    training (e.g. "connected" when only connected cells were measured) must stay finite for
    architectures where it differs."""
    std = values.std(axis=0)
    return np.where(std < 1e-3, 1.0, std)


def _train_member(
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    seed: int,
    progress: ProgressCallback | None,
    step_offset: int,
    total_steps: int,
) -> MultiDeviceNet:
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


def _ridge(x: np.ndarray, y: np.ndarray, penalty: np.ndarray) -> tuple[np.ndarray, float]:
    """Ridge with a penalty per column (inf drops the column); returns (coef, intercept)."""
    x_mean, y_mean = x.mean(axis=0), y.mean()
    keep = np.isfinite(penalty)
    xc = x[:, keep] - x_mean[keep]
    coef = np.zeros(x.shape[1])
    coef[keep] = np.linalg.lstsq(xc.T @ xc + np.diag(penalty[keep]), xc.T @ (y - y_mean), rcond=None)[0]
    return coef, float(y_mean - x_mean @ coef)


def _similarity_weights(reference: np.ndarray, y: np.ndarray, sharpness: float = SIMILARITY_SHARPNESS) -> np.ndarray:
    """Softmax over the reference devices of their correlation with the samples' log-latency."""
    rc = reference - reference.mean(axis=0)
    yc = y - y.mean()
    correlation = (rc.T @ yc) / np.clip(np.linalg.norm(rc, axis=0) * np.linalg.norm(yc), 1e-12, None)
    logits = sharpness * correlation
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def _loo_penalty(x: np.ndarray, y: np.ndarray,
                 blocks: Sequence[tuple[int, Sequence[float]]]) -> tuple[np.ndarray, tuple[float, ...]]:
    """The per-block ridge penalties, over the blocks' candidate grids, with the smallest
    leave-one-out squared error (closed form through the hat matrix). `blocks` lists each block's
    column count and candidates; an infinite penalty leaves a block out. Returns the per-column
    penalties and the chosen value of each block."""
    n = len(y)
    yc = y - y.mean()
    sizes = [size for size, _ in blocks]
    best, best_error = np.zeros(x.shape[1]), np.inf
    best_choice: tuple[float, ...] = ()
    for choice in itertools.product(*(grid for _, grid in blocks)):
        penalty = np.repeat(np.asarray(choice, dtype=np.float64), sizes)
        keep = np.isfinite(penalty)
        if not keep.any():
            continue
        xc = x[:, keep] - x[:, keep].mean(axis=0)
        hat = xc @ np.linalg.pinv(xc.T @ xc + np.diag(penalty[keep])) @ xc.T + 1.0 / n
        residual = (yc - (hat - 1.0 / n) @ yc) / np.clip(1 - np.diag(hat), 1e-6, None)
        error = float(np.mean(residual**2))
        if error < best_error:
            best, best_choice, best_error = penalty, tuple(float(c) for c in choice), error
    return best, best_choice
