"""Choosing a base predictor's default sampler by validation on its own reference devices.

Which sampler's few samples adapt the predictor best depends on the space and on the reference
devices (on the twelve tasks' train devices each candidate leads some folds at some k, see
docs/bench/predictor.md). So pre-training settles it the way one would settle any
hyper-parameter without a test device: leave-one-reference-device-out. For each of a few
reference devices in turn (all of them when there are at most `TrainConfig.sampler_folds`, else a
seeded subset), it pre-trains a fold predictor on the other reference devices with the same
configuration and seed, lets each candidate sampler pick k of the held-out device's measured
architectures (the sampler sees keys, never latencies), adapts the fold predictor to those k
samples, and scores Spearman's rho on the rest of the held-out device's architectures; seeds
`VALIDATION_SEEDS`, sample counts `VALIDATION_KS`. The candidate with the best mean rho at a
sample count becomes the predictor's preferred sampler for it (ties go to the earlier
candidate), and `get_sampler("default")` follows it, using the validated count nearest (in log
scale) to the k asked for. Only the rows handed to pre-training are ever read.

Pre-training validates only when asked (`TrainConfig.sampler_folds`, 0 by default): on held-out
reference devices (every 3rd NB201 and FBNet device as the target, the base pre-trained on the
others, 5 folds, 3 seeds) the choice validated per k scored a mean rho of 0.928 / 0.949 / 0.961
on NB201 and 0.896 / 0.906 / 0.920 on FBNet at k = 5 / 10 / 20, one choice for every k (the best
mean over them) 0.940 / 0.949 / 0.961 and 0.895 / 0.904 / 0.919, and the design sampler, what
`default` falls back to, 0.940 / 0.949 / 0.961 and 0.900 / 0.906 / 0.916, without the folds'
pre-training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from predictor.adaptation import prior_informative_rows
from predictor.metrics import spearman
from predictor.reference import LatencyTable
from predictor.samplers import get_sampler

if TYPE_CHECKING:
    from predictor.model import LatencyPredictor
    from predictor.spaces import SearchSpace

#: the samplers validated, in tie-break order; k-means medoids never led a validation fold's
#: mean at k=20 and cost seconds per pick on a 15k-architecture space, so they are left out
SAMPLER_CANDIDATES = ("design", "stratified", "random")
VALIDATION_KS = (5, 10, 20)
VALIDATION_SEEDS = (0, 1, 2)

#: fit(table, seed) -> a base predictor pre-trained on that table
Fit = Callable[[LatencyTable, int], "LatencyPredictor"]


def held_out_devices(devices: Sequence[str], folds: int, seed: int) -> list[str]:
    """The reference devices held out in turn: all of them, or a seeded subset of `folds`."""
    if folds <= 0 or len(devices) < 2:
        return []
    if len(devices) <= folds:
        return list(devices)
    picks = np.sort(np.random.default_rng(seed).choice(len(devices), size=folds, replace=False))
    return [devices[i] for i in picks]


def without_device(table: LatencyTable, device: str) -> LatencyTable:
    """The table less one device's column, and less the architectures only it measured."""
    keep = [i for i, d in enumerate(table.devices) if d != device]
    log_ms = table.log_ms[:, keep]
    rows = ~np.isnan(log_ms).all(axis=1)
    return LatencyTable([k for k, r in zip(table.keys, rows) if r], [table.devices[i] for i in keep], log_ms[rows])


def validate_samplers(
    space: SearchSpace,
    table: LatencyTable,
    fit: Fit,
    *,
    folds: int,
    seed: int = 0,
    candidates: Sequence[str] = SAMPLER_CANDIDATES,
    ks: Sequence[int] = VALIDATION_KS,
    seeds: Sequence[int] = VALIDATION_SEEDS,
) -> dict[str, dict[int, float]]:
    """Mean leave-one-reference-device-out Spearman rho per candidate sampler and sample count;
    empty when there are too few reference devices (or folds) to hold one out."""
    samplers = [get_sampler(name) for name in candidates]
    scores: dict[str, dict[int, list[float]]] = {name: {k: [] for k in ks} for name in candidates}
    for device in held_out_devices(table.devices, folds, seed):
        col = table.devices.index(device)
        measured = ~np.isnan(table.log_ms[:, col])
        keys = [key for key, m in zip(table.keys, measured) if m]
        if len(keys) <= 2 * max(ks):
            continue
        truth = dict(zip(keys, np.exp(table.log_ms[measured, col].astype(np.float64))))
        fold = _Designed(fit(without_device(table, device), seed), keys)
        measured_log = np.log(np.asarray([truth[key] for key in keys]))
        for name, sampler in zip(candidates, samplers):
            for k in ks:
                for sample_seed in seeds:
                    picked = sampler.select(space, k, seed=sample_seed, predictor=fold, candidates=keys)
                    rest = np.ones(len(keys), dtype=bool)
                    rest[[fold.row[key] for key in picked]] = False
                    # what `predict` answers on the held-out rest, in log-latency (ranks are all
                    # that count); the held-out device timed every key as written
                    device_fit = fold.predictor.adapt({key: truth[key] for key in picked}, name=device,
                                                      per_network=False).target
                    assert device_fit is not None  # adapt() always fits its device
                    predicted = device_fit.log_ms(fold.design[rest])[0]
                    scores[name][k].append(spearman(predicted, measured_log[rest]))
    if not any(scores[candidates[0]][k] for k in ks):
        return {}
    return {name: {k: float(np.nanmean(values)) for k, values in per_k.items()} for name, per_k in scores.items()}


class _Designed:
    """A fold predictor with the adaptation's design of every candidate computed once: the
    samplers read `descriptors`/`embed`/`most_informative` of the same keys many times over."""

    def __init__(self, predictor: LatencyPredictor, keys: list[str]) -> None:
        self.predictor = predictor
        self.row = {key: i for i, key in enumerate(keys)}
        self.design = predictor.design(keys, per_network=False)[0]
        self.n_reference = len(predictor.reference_devices)
        self.preferred_samplers: dict[int, str] = {}

    def descriptors(self, keys: Sequence[str]) -> np.ndarray:
        return self.design[[self.row[key] for key in keys]]

    def embed(self, keys: Sequence[str]) -> np.ndarray:
        return self.descriptors(keys)[:, : self.n_reference]

    def most_informative(self, keys: Sequence[str], n: int) -> list[str]:
        """`LatencyPredictor.most_informative` of a base predictor, for distinct networks."""
        rows = prior_informative_rows(self.predictor.prior, self.descriptors(keys), self.n_reference, n)
        return [keys[i] for i in rows]


def preferred_samplers(scores: dict[str, dict[int, float]]) -> dict[int, str]:
    """Per validated sample count, the candidate with the best mean rho (the first on a tie)."""
    if not scores:
        return {}
    ks = sorted(next(iter(scores.values())))
    return {k: max(scores, key=lambda name: (scores[name][k], -list(scores).index(name))) for k in ks}
