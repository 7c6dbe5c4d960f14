"""Randomised delays: capped exponential backoff with full jitter, and a jittered wait.

Every retry loop of the agent (HTTP retries in the client, the worker's registration, polling
and outbox retries) draws its delays here, from a `random.Random` the caller may inject to make
the delays deterministic in tests.
"""

from __future__ import annotations

import random

#: 2**62 s is far beyond any cap; a larger exponent would only risk a float overflow
_MAX_EXPONENT = 62


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """A delay drawn uniformly from [0, min(cap_s, base_s * 2**attempt)] ("full jitter"):
    retries of many agents spread out instead of arriving in waves."""
    ceiling = min(cap_s, base_s * 2 ** min(max(attempt, 0), _MAX_EXPONENT))
    return rng.uniform(0.0, ceiling)


def jittered(value: float, spread: float, rng: random.Random) -> float:
    """`value` scaled by a factor drawn uniformly from [1 - spread, 1 + spread]."""
    return value * rng.uniform(1.0 - spread, 1.0 + spread)
