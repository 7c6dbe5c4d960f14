"""Why an adapted predictor says what it says: which reference devices its device resembles, and
what each operation costs on it compared with the reference devices."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from predictor.model import LatencyPredictor

#: architectures drawn to compare devices and fit operation costs on
EXPLAIN_SAMPLE = 2000


@dataclass(frozen=True)
class Resemblance:
    device: str
    #: rank correlation of the two devices' predicted latencies over the sampled architectures
    spearman: float
    #: the reference device's coefficient in the adapted fit (its predictions are standardised)
    weight: float


@dataclass(frozen=True)
class OpCost:
    op: str
    #: latency change, in %, when one position of an architecture switches from the cheapest
    #: operation to this one, on the adapted device and on the reference devices' average
    effect_pct: float
    reference_effect_pct: float


@dataclass(frozen=True)
class Explanation:
    device: str
    architectures: int
    resembles: list[Resemblance]
    op_costs: list[OpCost]


def explain(model: LatencyPredictor, keys: Sequence[str] | None = None, seed: int = 0) -> Explanation:
    """Explain an adapted predictor over `keys` (default: a sample of its space)."""
    if model.target is None:
        raise ValueError("only an adapted predictor has a device to explain")
    keys = list(keys) if keys is not None else model.space.sample(min(EXPLAIN_SAMPLE, model.space.size()), seed)
    target_log = np.log(model.predict(keys)[0])
    per_network = model.target.per_network
    normalised = [model.space.network_key(k) if per_network else model.space.canonical(k) for k in keys]
    block = model.design(normalised, per_network)[0][:, : len(model.reference_devices)]
    reference_log = block * model.ensemble.log_std + model.ensemble.log_mean  # (n, n_ref)
    weights = model.target.coef[1 : 1 + len(model.reference_devices)]
    resembles = sorted(
        (Resemblance(device, float(spearmanr(target_log, reference_log[:, i]).statistic), float(weights[i]))
         for i, device in enumerate(model.reference_devices)),
        key=lambda r: -r.spearman,
    )
    counts = _op_counts(model, keys)
    used = counts.any(axis=0)
    names = [name for name, seen in zip(model.space.op_names, used) if seen]
    target_cost = _cost_per_op(counts[:, used], target_log)
    reference_cost = _cost_per_op(counts[:, used], reference_log.mean(axis=1))
    op_costs = sorted(
        (OpCost(name, _pct(target_cost[i]), _pct(reference_cost[i])) for i, name in enumerate(names)),
        key=lambda c: -c.effect_pct,
    )
    return Explanation(model.target.name, len(keys), resembles, op_costs)


def _op_counts(model: LatencyPredictor, keys: Sequence[str]) -> np.ndarray:
    """(n, n_ops) how often each operation appears in each architecture (input/output excluded)."""
    n_ops = len(model.space.op_names)
    counts = np.stack([np.bincount(model.space.graph(key).ops, minlength=n_ops) for key in keys]).astype(float)
    for endpoint in ("input", "output"):
        counts[:, model.space.op_names.index(endpoint)] = 0
    return counts


def _cost_per_op(counts: np.ndarray, log_ms: np.ndarray) -> np.ndarray:
    """Log-latency per operation instance, relative to the cheapest operation.

    Architectures of a space mostly hold a fixed number of positions, so the counts sum to a
    constant: only differences between operations are identified, hence the least-squares fit
    without intercept and the cheapest operation as the zero.
    """
    coef, *_ = np.linalg.lstsq(counts, log_ms, rcond=None)
    return coef - coef.min()


def _pct(log_ratio: float) -> float:
    return float(np.expm1(log_ratio) * 100)
