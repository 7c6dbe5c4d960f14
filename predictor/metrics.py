"""Accuracy of latency predictions, in one place: rank agreement (Spearman's rho, Kendall's
tau), relative error (MAPE, the share within +-10 %, the figure nn-Meter and LitePred quote) and
the calibration of an uncertainty (interval coverage, Spearman of std against |error|)."""

from __future__ import annotations

import numpy as np
from scipy import stats

#: the two-sided z of a 90 % normal interval
Z90 = float(stats.norm.ppf(0.95))


def _usable(a: np.ndarray, b: np.ndarray) -> bool:
    return len(a) >= 2 and bool(np.isfinite(a).all() and np.isfinite(b).all()) and np.ptp(a) > 0 and np.ptp(b) > 0


def spearman(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties); NaN when either side is constant or not finite."""
    a, b = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    return float(stats.spearmanr(a, b).statistic) if _usable(a, b) else float("nan")


def kendall(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Kendall's tau-b; NaN when either side is constant or not finite."""
    a, b = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    return float(stats.kendalltau(a, b).statistic) if _usable(a, b) else float("nan")


def mape(predicted_ms: np.ndarray, truth_ms: np.ndarray) -> float:
    """Mean absolute percentage error, in percent."""
    return float(np.mean(np.abs(np.asarray(predicted_ms) - truth_ms) / truth_ms) * 100)


def within(predicted_ms: np.ndarray, truth_ms: np.ndarray, tolerance: float = 0.10) -> float:
    """The share of predictions within +-`tolerance` of the truth ("+-10 % accuracy")."""
    return float(np.mean(np.abs(np.asarray(predicted_ms) - truth_ms) <= tolerance * np.asarray(truth_ms)))


def coverage(predicted_ms: np.ndarray, std_ms: np.ndarray, truth_ms: np.ndarray, z: float = Z90) -> float:
    """The share of truths inside the +-z standard deviation interval, taken in log-latency
    (the predictor's std in ms is the delta-method image of a log-latency std)."""
    log_std = np.asarray(std_ms) / np.asarray(predicted_ms)
    return float(np.mean(np.abs(np.log(truth_ms) - np.log(predicted_ms)) <= z * log_std))


def calibration_rho(predicted_ms: np.ndarray, std_ms: np.ndarray, truth_ms: np.ndarray) -> float:
    """Spearman of the predicted relative std against the relative error: does the uncertainty
    rank the errors?"""
    return spearman(np.asarray(std_ms) / predicted_ms, np.abs(np.log(truth_ms) - np.log(predicted_ms)))
