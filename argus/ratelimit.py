"""Sliding-window rate limiting (in memory, per process).

Used for failed-login throttling (refusal per client address; per email only
*counted*, for the progressive delay of :class:`argus.auth.Authenticator`), for
sign-ups per address and for the per-user message rate. A window of ``limit`` events per ``window_s``
seconds: :meth:`SlidingWindowLimiter.hit` records an event and says whether
it was allowed; :meth:`retry_after` tells the caller how long to wait.
Callers that must not let parallel requests slip past the limit *reserve*
a slot with :meth:`hit` before doing the work and give it back with
:meth:`undo` when it should not count.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Deque, Dict


class SlidingWindowLimiter:
    """At most ``limit`` events per key in any ``window_s``-second window.

    Thread-safe. Memory: O(limit) timestamps per active key. Keys whose
    window has emptied are dropped on access, and all of them are swept every
    ``SWEEP_EVERY`` recorded events, so many one-off keys (email addresses,
    client addresses) cannot grow memory without bound.
    """

    SWEEP_EVERY = 1024

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        if limit < 1 or window_s <= 0:
            raise ValueError(f"limit must be >= 1 and window_s > 0, got {limit=}, {window_s=}")
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._events: Dict[str, Deque[float]] = {}
        self._lock = threading.Lock()
        self._hits_since_sweep = 0

    def _trim(self, key: str, now: float) -> Deque[float]:
        q = self._events.get(key)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._events[key]
        return q

    def blocked(self, key: str) -> bool:
        """True when ``key`` has used its whole window (does not record an event)."""
        with self._lock:
            return len(self._trim(key, self._clock())) >= self.limit

    def hit(self, key: str) -> bool:
        """Record one event for ``key``; False (and nothing recorded) when over the limit."""
        with self._lock:
            now = self._clock()
            q = self._trim(key, now)
            if len(q) >= self.limit:
                return False
            self._events.setdefault(key, q).append(now)
            self._hits_since_sweep += 1
            if self._hits_since_sweep >= self.SWEEP_EVERY:
                self._hits_since_sweep = 0
                for k in list(self._events):
                    self._trim(k, now)
            return True

    def __len__(self) -> int:
        """Number of keys currently tracked."""
        with self._lock:
            return len(self._events)

    def count(self, key: str) -> int:
        """Events recorded for ``key`` in the current window (at most ``limit``)."""
        with self._lock:
            return len(self._trim(key, self._clock()))

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may act again (0.0 when it may now)."""
        with self._lock:
            now = self._clock()
            q = self._trim(key, now)
            if len(q) < self.limit:
                return 0.0
            return max(0.0, q[0] + self.window_s - now)

    def reset(self, key: str) -> None:
        """Forget ``key``'s events (e.g. after a successful login)."""
        with self._lock:
            self._events.pop(key, None)

    def undo(self, key: str) -> None:
        """Remove ``key``'s most recent event: give back a slot taken by :meth:`hit`
        that turned out not to count (e.g. a sign-in that succeeded). No-op
        when ``key`` has no events left in the window."""
        with self._lock:
            q = self._trim(key, self._clock())
            if q:
                q.pop()
                if not q:
                    del self._events[key]
