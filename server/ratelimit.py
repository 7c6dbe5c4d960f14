"""Per-token rate limits (a moving window, in this server process) for the endpoints a NAS loop
can hammer, `/predict` first, and caps on the long polls open at once."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from limits import parse, storage, strategies

from server.auth import Principal
from server.errors import TooManyRequests


class RateLimiter:
    """`limit` ("100/second", "5000/minute"; empty: no limit) per token and endpoint."""

    def __init__(self, limit: str) -> None:
        self.item = parse(limit) if limit else None
        self._window = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def hit(self, endpoint: str, principal: Principal) -> None:
        """Count a call; 429 when the window is full."""
        if self.item is None:
            return
        key = f"{principal.kind}:{principal.token_id or principal.agent_id or ''}"
        if not self._window.hit(self.item, endpoint, key):
            reset = self._window.get_window_stats(self.item, endpoint, key).reset_time
            retry_after_s = max(1, math.ceil(reset - time.time()))
            raise TooManyRequests(f"rate limit of {self.item} per token reached; retry in {retry_after_s} s",
                                  retry_after_s)


class PollSlots:
    """Long polls open at once in this server process, per agent (an agent token is one agent's)
    and in all: each holds a connection and a slot of the concurrency limit for up to its wait, so
    one token could otherwise hold every slot. Used from the event loop only."""

    #: seconds a refused poll is told to wait: about a poll's re-check interval
    RETRY_AFTER_S = 2

    def __init__(self, per_agent: int, total: int) -> None:
        self.per_agent = per_agent
        self.total = total
        self._open: Counter[int] = Counter()

    @contextmanager
    def hold(self, agent_id: int) -> Iterator[None]:
        if self._open[agent_id] >= self.per_agent:
            raise TooManyRequests(f"this agent already has {self.per_agent} long polls open", self.RETRY_AFTER_S)
        if self._open.total() >= self.total:
            raise TooManyRequests(f"this server has {self.total} long polls open", self.RETRY_AFTER_S)
        self._open[agent_id] += 1
        try:
            yield
        finally:
            self._open[agent_id] -= 1
            if not self._open[agent_id]:
                del self._open[agent_id]
