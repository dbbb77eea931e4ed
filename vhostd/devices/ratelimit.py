"""Log lines a front end can cause, at a bounded rate.

A hostile or broken driver can send millions of bad requests a second; each may deserve
a line, but the log must not grow at that rate. A token bucket lets ``burst`` lines
through at once and ``rate`` a second after that; the next line that passes says how
many were left out.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, rate: float = 1.0, burst: int = 10) -> None:
        self.logger = logger
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        """True if a line may be written now (then call :meth:`log`)."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.suppressed += 1
        return False

    def log(self, level: int, msg: str, *args: object) -> None:
        if not self.allow():
            return
        if self.suppressed:
            msg += f" ({self.suppressed} similar line(s) suppressed)"
            self.suppressed = 0
        self.logger.log(level, msg, *args)
