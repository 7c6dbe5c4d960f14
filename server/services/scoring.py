"""How good an adapted predictor is: rank correlation and error against measurements it did not
see, and how that grew with the number of samples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from predictor import LatencyPredictor

#: fewer held-out measurements than this say nothing about a ranking
MIN_VALIDATION = 5
#: sample counts of the learning curve (and the full count)
CURVE_SAMPLES = (5, 10, 15, 20, 30, 50, 100, 200)
#: folds of the cross-validation used when every measurement was a sample
FOLDS = 5
#: (measured, predicted) pairs kept for plots
MAX_POINTS = 300


def validate(base: LatencyPredictor, adapted: LatencyPredictor, samples: Mapping[str, float],
             validation: Mapping[str, float], seed: int = 0) -> dict[str, Any]:
    """`validation` and `curve` metrics on held-out measurements; without enough of them, a
    cross-validation over the samples (each predicted by a fit that did not see it)."""
    if len(validation) >= MIN_VALIDATION:
        keys = list(validation)
        predicted = adapted.predict(keys)[0]
        curve = [{"samples": k, "spearman": _spearman(_first(base, samples, k, seed).predict(keys)[0],
                                                      [validation[key] for key in keys])}
                 for k in _curve_points(len(samples))]
        return {"validation": _summary("held-out", keys, validation, predicted, seed), "curve": curve}
    if len(samples) >= 2 * FOLDS:
        keys = list(samples)
        predicted = np.empty(len(keys))
        fold_of = np.random.default_rng(seed).permutation(len(keys)) % FOLDS
        for fold in range(FOLDS):
            seen = {key: samples[key] for key, f in zip(keys, fold_of) if f != fold}
            held = [i for i, f in enumerate(fold_of) if f == fold]
            predicted[held] = base.adapt(seen).predict([keys[i] for i in held])[0]
        return {"validation": _summary(f"{FOLDS}-fold", keys, samples, predicted, seed)}
    return {}


def _first(base: LatencyPredictor, samples: Mapping[str, float], k: int, seed: int) -> LatencyPredictor:
    return base.adapt(dict(list(samples.items())[:k]))


def _curve_points(n: int) -> list[int]:
    return sorted({k for k in CURVE_SAMPLES if k < n} | {n}) if n >= 2 else []


def _summary(method: str, keys: list[str], truth: Mapping[str, float], predicted: np.ndarray,
             seed: int) -> dict[str, Any]:
    measured = np.asarray([truth[key] for key in keys])
    shown = np.random.default_rng(seed).permutation(len(keys))[:MAX_POINTS]
    return {
        "method": method,
        "n": len(keys),
        "spearman": _spearman(predicted, measured),
        "mape": round(float(np.mean(np.abs(predicted / measured - 1)) * 100), 2),
        "points": [[round(float(measured[i]), 4), round(float(predicted[i]), 4)] for i in sorted(shown)],
    }


def _spearman(predicted: np.ndarray, measured: object) -> float | None:
    """None where it is undefined (all measured latencies equal): JSON has no NaN."""
    rho = float(spearmanr(predicted, measured).statistic)
    return round(rho, 4) if np.isfinite(rho) else None
