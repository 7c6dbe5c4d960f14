"""The methods the bench compares, one small class each, all answering the same question:

given a task's context (its space, its base predictor and its train devices' latencies), a few
measured {key: ms} samples of a test device and the keys to predict, what is each key's latency?

A method never sees a test device's latencies beyond `samples`. `sampler` names the sampler the
harness uses to pick those samples; methods with the same sampler get the same samples for a
given (device, k, seed), so their scores are paired.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from predictor.cost import analytic_cost
from predictor.model import LatencyPredictor
from predictor.spaces import SearchSpace
from predictor.spaces.fbnet import FBNetSpace
from predictor.spaces.nb201 import NB201Space


@dataclass
class TaskContext:
    """What every method may use for one task: nothing of its test devices."""

    space: SearchSpace
    train_devices: tuple[str, ...]
    #: the base predictor pre-trained on the train devices (None when no method needs it)
    base: LatencyPredictor | None
    #: ms of each key on each train device (NaN where unmeasured); `reference_ms` reads it
    reference_index: dict[str, int] = field(repr=False, default_factory=dict)
    reference_table: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))
    #: how the test devices' keys are read (`LatencyPredictor.adapt`): None, as their tables
    #: timed them, the samples testing whether dead code cost anything; True, per network, as
    #: the farm measures a device (the reference latencies are then per network too)
    per_network: bool | None = None

    def reference_ms(self, keys: Sequence[str]) -> np.ndarray:
        """(len(keys), len(train_devices)) ms of the train devices, NaN where unmeasured."""
        out = np.full((len(keys), len(self.train_devices)), np.nan)
        rows = [self.reference_index.get(key, -1) for key in keys]
        known = np.asarray([r >= 0 for r in rows], dtype=bool)
        if known.any():
            out[known] = self.reference_table[np.asarray(rows)[known]]
        return out


@dataclass
class Prediction:
    ms: np.ndarray
    #: one standard deviation per key, for methods that estimate one
    std: np.ndarray | None = None
    #: timings and the like, recorded as diagnostics
    extras: dict[str, float] = field(default_factory=dict)
    #: the fitted model, when there is one worth timing further
    model: Any = None


class Method(ABC):
    name: str
    #: sampler that picks this method's measured architectures ("default", "random", ...)
    sampler: str = "random"
    #: whether `predict` uses `context.base` (the harness pre-trains only when some method does)
    needs_base: bool = False
    #: search spaces it applies to; None: all
    spaces: tuple[str, ...] | None = None
    #: its answers rank architectures but are not in ms (relative errors mean nothing)
    ranks_only: bool = False

    def supports(self, space: str) -> bool:
        return self.spaces is None or space in self.spaces

    @abstractmethod
    def predict(self, context: TaskContext, device: str, samples: Mapping[str, float],
                keys: Sequence[str], seed: int) -> Prediction:
        """Latency (ms) of each of `keys` on `device`, from its measured `samples`."""


class Ours(Method):
    """The pre-trained multi-device predictor, adapted to the device from its samples."""

    name = "ours"
    sampler = "default"
    needs_base = True

    def predict(self, context: TaskContext, device: str, samples: Mapping[str, float],
                keys: Sequence[str], seed: int) -> Prediction:
        if context.base is None:
            raise ValueError(f"{self.name} needs a base predictor")
        start = time.perf_counter()
        adapted = context.base.adapt(dict(samples), name=device, per_network=context.per_network)
        adapt_s = time.perf_counter() - start
        prediction = adapted.prediction(list(keys))
        extras = {"adapt_s": adapt_s, "measured_share_min": float(prediction.measured_share.min())}
        return Prediction(prediction.ms, prediction.std, extras, adapted)


class OursRandom(Ours):
    """The same predictor adapted from randomly chosen samples: the sampler's share of the score."""

    name = "ours_random"
    sampler = "random"


class Flops(Method):
    """FLOPs as the latency: needs no samples; scored on the same held-out keys as the others."""

    name = "flops"
    spaces = ("nb201", "fbnet")
    ranks_only = True

    def __init__(self) -> None:
        self._macs: dict[str, dict[str, int]] = {}

    def macs(self, space: SearchSpace, keys: Sequence[str]) -> np.ndarray:
        known = self._macs.setdefault(space.name, {})
        missing = [key for key in dict.fromkeys(keys) if key not in known]
        if missing:
            known.update(zip(missing, analytic_cost(space, missing)[0].tolist()))
        return np.asarray([known[key] for key in keys], dtype=np.float64)

    def predict(self, context: TaskContext, device: str, samples: Mapping[str, float],
                keys: Sequence[str], seed: int) -> Prediction:
        return Prediction(self.macs(context.space, keys))


class OneProxy(Method):
    """The train device whose latencies rank the samples best, rescaled by a log-log line fit.

    Keys the chosen device never measured fall back to the next best device, and so on.
    """

    name = "one_proxy"

    def predict(self, context: TaskContext, device: str, samples: Mapping[str, float],
                keys: Sequence[str], seed: int) -> Prediction:
        sample_keys = list(samples)
        y = np.log(np.asarray([samples[k] for k in sample_keys]))
        reference = context.reference_ms(sample_keys)
        scored = []
        for col in range(reference.shape[1]):
            seen = np.isfinite(reference[:, col])
            if seen.sum() >= 3 and np.ptp(reference[seen, col]) > 0:
                rho = spearmanr(reference[seen, col], y[seen]).statistic
                scored.append((-np.nan_to_num(rho, nan=-1.0), col))
        if not scored:
            raise ValueError("no train device measured enough of the samples")
        targets = context.reference_ms(keys)
        ms = np.full(len(keys), np.nan)
        for _, col in sorted(scored):
            seen = np.isfinite(reference[:, col])
            slope, intercept = np.polyfit(np.log(reference[seen, col]), y[seen], 1)
            fill = np.isnan(ms) & np.isfinite(targets[:, col])
            ms[fill] = np.exp(slope * np.log(targets[fill, col]) + intercept)
            if not np.isnan(ms).any():
                break
        ms[np.isnan(ms)] = np.exp(y.mean())
        return Prediction(ms)


class TableRidge(Method):
    """Ridge regression of the device's log-latency on the train devices' measured
    log-latencies (the published tables hold every architecture), penalty by leave-one-out;
    keys some train device never measured get that device's mean."""

    name = "table_ridge"

    def predict(self, context: TaskContext, device: str, samples: Mapping[str, float],
                keys: Sequence[str], seed: int) -> Prediction:
        sample_keys = list(samples)
        x_train = np.log(context.reference_ms(sample_keys))
        x_test = np.log(context.reference_ms(list(keys)))
        fill = np.nanmean(x_test, axis=0)
        x_train = np.where(np.isnan(x_train), fill, x_train)
        x_test = np.where(np.isnan(x_test), fill, x_test)
        y = np.log(np.asarray([samples[k] for k in sample_keys]))
        return Prediction(np.exp(ridge_fit_predict(x_train, y, x_test)))


class Scratch(Method):
    """Ridge regression of log-latency on the space's features, fitted on the samples alone."""

    name = "scratch"

    def predict(self, context: TaskContext, device: str, samples: Mapping[str, float],
                keys: Sequence[str], seed: int) -> Prediction:
        sample_keys = list(samples)
        x_train = context.space.features(sample_keys).astype(np.float64)
        x_test = context.space.features(list(keys)).astype(np.float64)
        mean, std = x_test.mean(axis=0), x_test.std(axis=0) + 1e-6  # keys only, no latencies
        y = np.log(np.asarray([samples[k] for k in sample_keys]))
        log_ms = ridge_fit_predict((x_train - mean) / std, y, (x_test - mean) / std)
        return Prediction(np.exp(log_ms))


class LookupTable(Method):
    """A learned lookup table: latency (ms) as a sum of one entry per (block, op), fitted by
    ridge on one-hot block encodings; only for spaces that are chains of blocks (FBNet)."""

    name = "lut"
    spaces = ("fbnet",)

    def predict(self, context: TaskContext, device: str, samples: Mapping[str, float],
                keys: Sequence[str], seed: int) -> Prediction:
        space = context.space
        n_ops = len(space.op_names) - 2  # less "input" and "output"
        sample_keys = list(samples)
        y = np.asarray([samples[k] for k in sample_keys])
        ms = ridge_fit_predict(_one_hot_blocks(space, sample_keys, n_ops), y,
                               _one_hot_blocks(space, list(keys), n_ops))
        return Prediction(ms)


def _one_hot_blocks(space: SearchSpace, keys: Sequence[str], n_ops: int) -> np.ndarray:
    if not isinstance(space, NB201Space | FBNetSpace):
        raise ValueError(f"one-hot blocks need a space of op vectors, not {space.name}")
    ops = np.asarray([space.op_vec(key) for key in keys], dtype=np.int64)
    return np.eye(n_ops)[ops].reshape(len(keys), -1)


def ridge_fit_predict(x: np.ndarray, y: np.ndarray, x_new: np.ndarray,
                      grid: Sequence[float] = tuple(np.logspace(-3, 4, 15))) -> np.ndarray:
    """Ridge with an unpenalised intercept, in kernel form (few samples, many features); the
    penalty with the smallest leave-one-out error (closed form through the hat matrix)."""
    x_mean, y_mean = x.mean(axis=0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    gram = xc @ xc.T
    n = len(y)
    best, best_error = None, np.inf
    for alpha in grid:
        inverse = np.linalg.inv(gram + alpha * np.eye(n))
        dual = inverse @ yc
        hat = gram @ inverse + 1.0 / n
        residual = (yc - gram @ dual) / np.clip(1 - np.diag(hat), 1e-6, None)
        error = float(np.mean(residual**2))
        if error < best_error:
            best, best_error = dual, error
    return y_mean + (x_new - x_mean) @ (xc.T @ best)


METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Ours, OursRandom, Flops, OneProxy, TableRidge, Scratch, LookupTable)
}


def get_methods(names: Sequence[str] | None = None) -> list[Method]:
    """Fresh instances of the named methods (all when None), in the order given."""
    names = list(METHODS) if names is None else list(names)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(METHODS)}")
    return [METHODS[name]() for name in names]
