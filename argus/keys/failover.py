"""One request's way through the key pool: the next key, and whether to try another.

A chat turn, an image or a video asks :class:`Failover` for a key, calls the
provider with it and reports the outcome:

* a failure *before any output* caused by the key (``rate_limited``,
  ``quota_exhausted``, ``invalid_key``) moves on to the next key at once;
* a ``server_error``/``network_error`` moves on after a jittered exponential
  backoff (:data:`BACKOFF_BASE_S` doubling up to :data:`BACKOFF_MAX_S`, times a
  random factor in [0.5, 1)); the failing key is tried again only when no other
  key is left;
* ``blocked``/``bad_request`` end the request (another key would fare no better);
* at most :data:`MAX_ATTEMPTS` keys are tried per request.

When :meth:`Failover.next` returns None, no key is left: the caller falls back
(the chat to the local model) and says so. The pool's store calls run in a
thread (``asyncio.to_thread``); nothing here blocks the event loop.
"""
from __future__ import annotations

import asyncio
import random
from typing import Awaitable, Callable, Optional

from argus.catalogue import ModelSpec
from argus.keys.pool import KeyPool, Lease
from argus.providers.base import ProviderError, Usage

#: Keys tried per request, at most.
MAX_ATTEMPTS = 4
#: Backoff before the next key after a server or network error, in seconds.
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 4.0


class Failover:
    """Keys for one request to ``spec``, tried in the pool's order.

    Args:
        pool: the key pool.
        spec: the model asked.
        tokens: the request's estimated input tokens (checked against TPM limits).
        max_attempts: keys tried at most.
        sleep: ``asyncio.sleep`` (injectable for tests).
        rng: a number in [0, 1) for the backoff jitter.

    Attributes:
        attempts: keys handed out so far.
        errors: the failures reported, in order.
        invalid: the leases whose keys were found invalid (the caller tells the admins).
    """

    def __init__(
        self,
        pool: KeyPool,
        spec: ModelSpec,
        *,
        tokens: int = 0,
        max_attempts: int = MAX_ATTEMPTS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ):
        self.pool = pool
        self.spec = spec
        self.tokens = tokens
        self.max_attempts = max_attempts
        self.attempts = 0
        self.errors: list[ProviderError] = []
        self.invalid: list[Lease] = []
        self._sleep = sleep
        self._rng = rng
        self._bad: set[str] = set()  # key errors: never again in this request
        self._flaky: set[str] = set()  # server/network errors: only when nothing else is left
        self._transient_failures = 0

    async def next(self) -> Optional[Lease]:
        """The next key to try, or None when the attempts are used up or no key may serve now.
        Raises StoreUnavailable."""
        if self.attempts >= self.max_attempts:
            return None
        lease = await asyncio.to_thread(
            self.pool.acquire, self.spec, tokens=self.tokens, exclude=self._bad | self._flaky
        )
        if lease is None and self._flaky:
            lease = await asyncio.to_thread(self.pool.acquire, self.spec, tokens=self.tokens, exclude=self._bad)
        if lease is not None:
            self.attempts += 1
        return lease

    async def failed(self, lease: Lease, error: ProviderError) -> bool:
        """Report that ``lease`` failed with ``error`` (nothing was streamed yet unless
        ``error.partial``). Returns True when another key should be tried now (after the
        backoff this already waited). Raises StoreUnavailable."""
        self.errors.append(error)
        if await asyncio.to_thread(self.pool.failed, lease, error) == "invalid":
            self.invalid.append(lease)
        if error.partial or error.kind in ("blocked", "bad_request"):
            return False
        if error.kind in ("server_error", "network_error"):
            self._flaky.add(lease.key_id)
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** self._transient_failures) * (0.5 + self._rng() / 2)
            self._transient_failures += 1
            if self.attempts < self.max_attempts:
                await self._sleep(delay)
        else:
            self._bad.add(lease.key_id)
        return self.attempts < self.max_attempts

    async def succeeded(self, lease: Lease, usage: Optional[Usage], user_id: str) -> None:
        """Record the answer's usage for the key, the user and the model. Raises StoreUnavailable."""
        await asyncio.to_thread(self.pool.succeeded, lease, usage, user_id)

    @property
    def last_error(self) -> Optional[ProviderError]:
        return self.errors[-1] if self.errors else None
