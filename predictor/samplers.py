"""Samplers: which few architectures to measure on a new device.

Every sampler draws distinct networks: of candidate keys that build the same network
(`SearchSpace.network_key`) only the first is a candidate, so no two samples measure one network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from predictor.spaces import SearchSpace

#: candidates considered for spaces too large to enumerate
CANDIDATE_POOL = 5000


class Embedding(Protocol):
    """What samplers read of a predictor (a `LatencyPredictor` is one)."""

    #: validated sample count -> the sampler name that adapted best at it
    preferred_samplers: Mapping[int, str]

    def descriptors(self, keys: Sequence[str]) -> np.ndarray:
        """Per key, what the adaptation regresses on."""

    def embed(self, keys: Sequence[str]) -> np.ndarray:
        """Per key, how the reference devices see it."""


class Sampler(ABC):
    name: str

    @abstractmethod
    def select(
        self,
        space: SearchSpace,
        k: int,
        seed: int = 0,
        predictor: Embedding | None = None,
        candidates: Sequence[str] | None = None,
    ) -> list[str]:
        """`k` distinct canonical keys to measure, reproducible from `seed`."""


def candidate_keys(space: SearchSpace, seed: int, candidates: Sequence[str] | None) -> list[str]:
    """The candidates (default: the whole space, or a sample of it), one key per network."""
    if candidates is not None:
        keys = [space.canonical(key) for key in candidates]
    else:
        try:
            keys = list(space.enumerate())
        except NotImplementedError:
            keys = space.sample(CANDIDATE_POOL, seed)
    first: dict[str, str] = {}
    for key in keys:
        first.setdefault(space.network_key(key), key)
    return list(first.values())


class RandomSampler(Sampler):
    name = "random"

    def select(self, space, k, seed=0, predictor=None, candidates=None):  # type: ignore[no-untyped-def]
        pool = candidate_keys(space, seed, candidates)
        _check_k(k, len(pool))
        picks = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
        return [pool[i] for i in picks]


class KMeansSampler(Sampler):
    """Cluster the candidates in the predictor's reference-latency embedding, take the medoids.

    Each pick stands for a distinct region of how the reference devices see the space, so the
    few samples span the latency range and its device-specific quirks rather than its dense middle.
    """

    name = "kmeans"
    iterations = 25

    def select(self, space, k, seed=0, predictor=None, candidates=None):  # type: ignore[no-untyped-def]
        pool = candidate_keys(space, seed, candidates)
        _check_k(k, len(pool))
        embedding = predictor.embed(pool) if predictor is not None else space.features(pool)
        embedding = (embedding - embedding.mean(axis=0)) / (embedding.std(axis=0) + 1e-6)
        rng = np.random.default_rng(seed)
        centres = _kmeans_plus_plus(embedding, k, rng)
        for _ in range(self.iterations):
            assignment = _nearest(embedding, centres)
            for c in range(k):
                members = embedding[assignment == c]
                if len(members):
                    centres[c] = members.mean(axis=0)
        chosen: list[int] = []
        for centre in centres:
            distances = ((embedding - centre) ** 2).sum(axis=1)
            distances[chosen] = np.inf
            chosen.append(int(distances.argmin()))
        return [pool[i] for i in chosen]


class StratifiedSampler(Sampler):
    """One random architecture from each of k equal-count strata along the candidates' main axis.

    The axis is the first principal component of what the adaptation regresses on (the reference
    devices' predicted latencies and the architecture descriptors), so the samples cover that
    range evenly, fast to slow, while the pick inside a stratum stays random and so unbiased in
    everything else.
    """

    name = "stratified"

    def select(self, space, k, seed=0, predictor=None, candidates=None):  # type: ignore[no-untyped-def]
        pool = candidate_keys(space, seed, candidates)
        _check_k(k, len(pool))
        embedding = predictor.descriptors(pool) if predictor is not None else space.features(pool)
        centred = (embedding - embedding.mean(axis=0)) / (embedding.std(axis=0) + 1e-6)
        # the first principal axis, from the small covariance rather than an SVD of every candidate
        direction = np.linalg.eigh(centred.T @ centred)[1][:, -1]
        order = np.argsort(centred @ direction, kind="stable")
        rng = np.random.default_rng(seed)
        return [pool[int(rng.choice(stratum))] for stratum in np.array_split(order, k)]


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [points[rng.integers(len(points))]]
    closest = ((points - centres[0]) ** 2).sum(axis=1)
    for _ in range(k - 1):
        weights = closest / closest.sum() if closest.sum() > 0 else None
        centres.append(points[rng.choice(len(points), p=weights)])
        closest = np.minimum(closest, ((points - centres[-1]) ** 2).sum(axis=1))
    return np.stack(centres).astype(np.float64)


def _nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    distances = (points**2).sum(axis=1)[:, None] - 2 * points @ centres.T + (centres**2).sum(axis=1)[None, :]
    return distances.argmin(axis=1)


def _check_k(k: int, pool_size: int) -> None:
    if not 1 <= k <= pool_size:
        raise ValueError(f"k must be between 1 and {pool_size}, got {k}")


class DefaultSampler(Sampler):
    """The sampler the predictor's pre-training validated best at the nearest sample count.

    Pre-training holds out reference devices in turn and compares the candidate samplers' k-shot
    adaptations on them (`predictor.validation`); the winners travel in the checkpoint as
    `preferred_samplers`. Without a predictor, or with one that made no choice (too few reference
    devices, an older checkpoint), this is `FALLBACK_SAMPLER`.
    """

    name = "default"

    def resolve(self, k: int, predictor: Embedding | None = None) -> str:
        """The name of the sampler `select` delegates to for `k` samples."""
        preferred = getattr(predictor, "preferred_samplers", None) or {}
        return sampler_for(preferred, k) or FALLBACK_SAMPLER

    def select(self, space, k, seed=0, predictor=None, candidates=None):  # type: ignore[no-untyped-def]
        return SAMPLERS[self.resolve(k, predictor)]().select(space, k, seed=seed, predictor=predictor,
                                                            candidates=candidates)


SAMPLERS: dict[str, type[Sampler]] = {"random": RandomSampler, "kmeans": KMeansSampler,
                                      "stratified": StratifiedSampler}
#: what "default" uses when the predictor holds no validated preference
FALLBACK_SAMPLER = "stratified"


def sampler_for(preferred: Mapping[int, str], k: int) -> str | None:
    """The preferred sampler at the validated sample count nearest to `k` (in log scale)."""
    if not preferred:
        return None
    nearest = min(preferred, key=lambda validated: (abs(np.log(validated) - np.log(max(k, 1))), validated))
    return preferred[nearest]


def get_sampler(name: str) -> Sampler:
    """A sampler by name; "default" follows the predictor's validated preference (see
    `DefaultSampler`)."""
    if name == "default":
        return DefaultSampler()
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: default, {', '.join(SAMPLERS)}")
    return SAMPLERS[name]()
