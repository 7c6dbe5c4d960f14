"""Quality flags of a measurement, computed from its raw samples.

The server computes them (it does not trust an agent's summary); the agent uses them in its log.
Measurements whose median they put in doubt (`trusted`) are kept but neither trained on by
default nor reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median, quantiles

from agent.protocol import TimingProtocol

#: interquartile range / median at or above which a measurement is `unstable`
UNSTABLE_IQR_RATIO = 0.10
#: relative change of the median from the first third of the runs to the last third beyond
#: which a measurement is `drift`
DRIFT_RATIO = 0.05
#: fewer runs than this cannot show drift
MIN_RUNS_FOR_DRIFT = 9
#: timed runs must add up to this share of the protocol's `min_seconds`, or the measurement is
#: `short` (the run cap was hit first); the rest is the timer's own overhead between runs
SHORT_TIME_SHARE = 0.9
#: flags that put a measurement's median in doubt
DOUBTFUL_FLAGS = frozenset({"unstable", "drift"})


def quality_flags(samples_ms: Sequence[float], protocol: TimingProtocol) -> list[str]:
    """`unstable`, `drift` and `short`, in that order, for the samples that apply."""
    n = len(samples_ms)
    if n == 0:
        return ["short"]
    flags = []
    mid = median(samples_ms)
    if n >= 2:
        q1, _, q3 = quantiles(samples_ms, n=4, method="inclusive")
        if (q3 - q1) / mid >= UNSTABLE_IQR_RATIO:
            flags.append("unstable")
    if n >= MIN_RUNS_FOR_DRIFT:
        third = n // 3
        first, last = median(samples_ms[:third]), median(samples_ms[-third:])
        if abs(last / first - 1) > DRIFT_RATIO:
            flags.append("drift")
    if n < protocol.min_runs or sum(samples_ms) / 1000 < SHORT_TIME_SHARE * protocol.min_seconds:
        flags.append("short")
    return flags


def trusted(samples_ms: Sequence[float], protocol: TimingProtocol, flags: Sequence[str]) -> bool:
    """Whether a measurement's median is trained on and reused: neither `unstable` nor `drift`,
    and at least `min_runs` runs. A `short` measurement that ran them is trusted: its model is so
    fast that the run cap came before `min_seconds`, and the median of thousands of runs is as
    exact as the timer. Left out, such measurements cut every sample set at its fast end (a
    collection onboarded on 6 small models was adapted on the slower 3: rho -0.886 on the rest)."""
    return len(samples_ms) >= protocol.min_runs and DOUBTFUL_FLAGS.isdisjoint(flags)
