"""Per-token rate limits (a moving window, in this server process) for the endpoints a NAS loop
can hammer, `/predict` first."""

from __future__ import annotations

import math
import time

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
