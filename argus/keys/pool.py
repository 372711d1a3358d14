"""The API-key pool: which key serves the next request, and what a failure does to a key.

Keys come from the environment (``GEMINI_API_KEYS``… via ``Settings.api_keys``:
each process reads its own, they are never written to the store) and from
admins (``/keys add``: sealed with AES-256-GCM, ``argus.keys.secretbox``). Every
key has a record in the store (``Store.add_api_key``) holding its state,
cooldown, rotation order and rate-limit counters, so every server process
sharing the database sees and updates the same ones.

Rotation: :meth:`KeyPool.acquire` asks the store for the next key
(``Store.acquire_api_key``): one atomic step over all processes that picks the
enabled, not-cooling-down key with the lowest rotation number whose counters for
the model stay within the catalogue's limits, gives it the next number and
counts the request. Keys therefore take turns across processes, and a key near
its RPM/RPD/TPM limit is skipped until its window moves on.

Failures (:meth:`KeyPool.failed`, from the provider's ``ProviderError.kind``):

* ``rate_limited``: cool down for the server's ``retry_after_s`` (else :data:`RATE_LIMIT_COOLDOWN_S`);
* ``quota_exhausted``: cool down until the provider's quota day ends (and at least ``retry_after_s``);
* ``invalid_key``: the key's state becomes ``invalid`` (an admin may enable it again);
* ``server_error``/``network_error``: a short cooldown (:data:`TRANSIENT_COOLDOWN_S`) so the
  next requests go to other keys first;
* ``blocked``/``bad_request``: nothing (the request was the problem, not the key).

Only :func:`~argus.providers.base.fingerprint` of a key is ever logged or shown.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Mapping, Optional, Sequence
from zoneinfo import ZoneInfo

from argus.catalogue import Catalogue, ModelSpec
from argus.keys.secretbox import SealedKeyError, SecretBox
from argus.providers.base import ProviderError, Usage, fingerprint, scrub
from argus.store.base import ApiKeyRecord, KeyExists, NotFound, Store

log = logging.getLogger(__name__)

#: Cooldown after a 429 that did not say how long to wait, in seconds.
RATE_LIMIT_COOLDOWN_S = 60.0
#: Cooldown after a server or network error, in seconds (other keys go first meanwhile).
TRANSIENT_COOLDOWN_S = 5.0
#: Longest cooldown a server may ask for, in seconds.
MAX_COOLDOWN_S = 24 * 3600.0
#: Seconds the list of providers with usable keys is cached.
AVAILABLE_TTL_S = 5.0
#: Longest API key accepted, in characters.
MAX_KEY_CHARS = 512
#: The reasons a key may be out of rotation, as ``last_error`` shows them.
UNDECRYPTABLE = "undecryptable"


class KeyPoolError(Exception):
    """A key-pool request cannot be done; ``str(e)`` is one sentence for an admin."""


class UnknownKey(KeyPoolError):
    """No stored key (or more than one) matches the reference given."""


@dataclass(frozen=True)
class Lease:
    """One key handed out for one request. ``secret`` is the key itself: pass it to the
    provider, never to a log or a message (``repr`` leaves it out)."""

    key_id: str
    provider: str
    model: str
    fingerprint: str
    source: str
    secret: str = field(repr=False)


def utc_day(now: float) -> str:
    """``YYYY-MM-DD`` of ``now`` (UNIX seconds) in UTC: the day of usage buckets."""
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d")


def quota_day(now: float, zone: str) -> str:
    """``YYYY-MM-DD`` of ``now`` in the time zone where the provider's daily quota resets."""
    return datetime.fromtimestamp(now, ZoneInfo(zone)).strftime("%Y-%m-%d")


def seconds_to_next_day(now: float, zone: str) -> float:
    """Seconds from ``now`` to the next midnight in ``zone`` (when a daily quota resets)."""
    local = datetime.fromtimestamp(now, ZoneInfo(zone))
    midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1.0, midnight.timestamp() - now)


class KeyPool:
    """The keys of every remote provider, over a shared store.

    Args:
        store: where key records, counters and usage live (blocking; call from a thread).
        box: seals and opens app keys; also derives key ids.
        catalogue: model limits and each provider's quota-day time zone.
        env_keys: provider → keys from this process's environment.
        tier: which catalogue limits apply (``"free"`` or ``"tier1"``).
        clock: UNIX seconds (injectable for tests).

    Every method blocks on the store. Thread-safe.
    """

    def __init__(
        self,
        store: Store,
        box: SecretBox,
        catalogue: Catalogue,
        *,
        env_keys: Mapping[str, Sequence[str]] = (),
        tier: str = "free",
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.box = box
        self.catalogue = catalogue
        self.tier = tier
        self.clock = clock
        self.providers = tuple(catalogue.providers)
        self._env: dict[str, tuple[str, str]] = {}  # key id -> (provider, key)
        for provider, keys in dict(env_keys or {}).items():
            for key in keys:
                self._env[self.key_id(provider, key)] = (provider, key)
        self._opened: dict[str, str] = {}  # key id -> app key, opened once
        self._lock = threading.Lock()
        self._available: Optional[tuple[float, frozenset[str]]] = None

    def __repr__(self) -> str:
        return f"KeyPool({len(self._env)} environment keys, tier={self.tier!r})"

    # ---- identities ------------------------------------------------------
    def key_id(self, provider: str, key: str) -> str:
        """The store id of ``key``: a digest under the server secret (the same key of the same
        provider always gets the same id; the id reveals nothing about the key)."""
        return "k" + self.box.digest(f"{provider}\0{key}")[:31]

    @staticmethod
    def _aad(key_id: str, provider: str) -> bytes:
        return f"{key_id}|{provider}".encode()

    def secrets(self) -> list[str]:
        """Every key this process knows in clear (for :meth:`scrub`)."""
        with self._lock:
            return [k for _, k in self._env.values()] + list(self._opened.values())

    def scrub(self, text: str) -> str:
        """``text`` with every known key replaced by its fingerprint (and key-like strings removed)."""
        return scrub(text, self.secrets())

    # ---- start-up ----------------------------------------------------------
    def sync_env(self) -> None:
        """Give every environment key a store record (once; existing ones are left alone) and log
        how many keys each provider has, by fingerprint. Raises StoreUnavailable."""
        for key_id, (provider, key) in self._env.items():
            try:
                self.store.add_api_key(key_id, provider, "env", fingerprint(key))
            except KeyExists:
                pass
        for provider in self.providers:
            fps = [fingerprint(k) for p, k in self._env.values() if p == provider]
            if fps:
                log.info("%d %s API key(s) from the environment: %s", len(fps), provider, ", ".join(fps))
        self._available = None

    # ---- admin operations ------------------------------------------------
    def add(self, provider: str, key: str) -> ApiKeyRecord:
        """Add an admin's key: sealed, stored, enabled.

        Raises:
            KeyPoolError: unknown provider, or not a plausible key (the message repeats
                neither argument: either may be the key, e.g. when they were swapped).
            KeyExists: the key is already in the pool (from the environment or added before).
            StoreUnavailable.
        """
        provider = provider.strip().lower()
        key = key.strip()
        if provider not in self.providers:
            # Never repeat the value: with the arguments swapped it is the key.
            swapped = key.lower() in self.providers
            raise KeyPoolError(
                f"Unknown provider; use one of: {', '.join(self.providers)}."
                + (" The provider comes first: `/keys add <provider> <key>`." if swapped else "")
            )
        if not key or len(key) > MAX_KEY_CHARS or any(c.isspace() or c in "\"'`" for c in key):
            raise KeyPoolError("That does not look like an API key (it is empty, too long, or has spaces or quotes).")
        key_id = self.key_id(provider, key)
        rec = self.store.add_api_key(
            key_id, provider, "app", fingerprint(key), ciphertext=self.box.seal(key, self._aad(key_id, provider))
        )
        with self._lock:
            self._opened[key_id] = key
            self._available = None
        log.info("%s API key %s added in the app", provider, rec.fingerprint)
        return rec

    def list(self, provider: Optional[str] = None) -> list[ApiKeyRecord]:
        """The stored keys, oldest first. Raises StoreUnavailable."""
        return self.store.list_api_keys(provider)

    def in_environment(self, key_id: str) -> bool:
        """Whether this process has the environment key ``key_id``."""
        return key_id in self._env

    def find(self, ref: str) -> ApiKeyRecord:
        """The stored key a person means by ``ref``: its fingerprint (``…a1b2`` or ``a1b2``),
        ``provider:fingerprint``, or its id.

        Raises:
            UnknownKey: none or several match (the message says which).
        """
        ref = ref.strip().strip("`")
        provider, _, rest = ref.rpartition(":")
        wanted = rest.lstrip("…").lstrip(".").lower()  # "…a1b2", "...a1b2" or "a1b2"
        keys = [k for k in self.list(provider.lower() or None) if k.id == rest or k.fingerprint.lstrip("…") == wanted]
        if not keys:
            raise UnknownKey(f"No key matches {ref[:40]!r}; /keys list shows the fingerprints.")
        if len(keys) > 1:
            raise UnknownKey(
                f"Several keys match {ref[:40]!r} ({', '.join(f'{k.provider}:{k.fingerprint}' for k in keys)}); "
                "write it as provider:fingerprint."
            )
        return keys[0]

    def set_state(self, key_id: str, state: str) -> ApiKeyRecord:
        """Enable (also ends a cooldown and clears the last error) or disable a key."""
        rec = self.store.set_api_key_state(key_id, state, error="" if state == "enabled" else None)
        self._available = None
        log.info("%s API key %s is now %s", rec.provider, rec.fingerprint, state)
        return rec

    def remove(self, key_id: str) -> ApiKeyRecord:
        """Delete a key added in the app. An environment key cannot be deleted here (it would come
        back at the next start): it is disabled instead and the returned record says so.
        Raises NotFound, StoreUnavailable."""
        rec = self.store.get_api_key(key_id)
        if rec.source == "env":
            return self.set_state(key_id, "disabled")
        self.store.delete_api_key(key_id)
        with self._lock:
            self._opened.pop(key_id, None)
            self._available = None
        log.info("%s API key %s removed", rec.provider, rec.fingerprint)
        return rec

    # ---- serving requests -------------------------------------------------
    def available_providers(self) -> frozenset[str]:
        """Providers with at least one enabled key this process can use (cooling down counts:
        it comes back by itself). Cached for :data:`AVAILABLE_TTL_S`. Raises StoreUnavailable."""
        now = self.clock()
        cached = self._available
        if cached is not None and now - cached[0] < AVAILABLE_TTL_S:
            return cached[1]
        providers = frozenset(
            k.provider for k in self.store.list_api_keys()
            if k.state == "enabled" and (k.source == "app" or k.id in self._env)
        )
        self._available = (now, providers)
        return providers

    def acquire(self, spec: ModelSpec, *, tokens: int = 0, exclude: Iterable[str] = ()) -> Optional[Lease]:
        """The next key for one request to ``spec`` (see the module docstring), or None when
        no key of its provider may take it now. ``tokens``: the request's estimated input
        tokens. A stored key that does not open (the server secret changed) is disabled and
        skipped. Raises StoreUnavailable."""
        limits = spec.limits_for(self.tier)
        skip = set(exclude)
        while True:
            now = self.clock()
            rec = self.store.acquire_api_key(
                spec.provider, spec.id, now=now, day=quota_day(now, spec.day_resets),
                rpm=limits.rpm, tpm=limits.tpm, rpd=limits.rpd, tokens=tokens,
                env_ids=list(self._env), exclude=sorted(skip),
            )
            if rec is None:
                return None
            secret = self._secret(rec)
            if secret is not None:
                return Lease(rec.id, rec.provider, spec.id, rec.fingerprint, rec.source, secret)
            skip.add(rec.id)

    def _secret(self, rec: ApiKeyRecord) -> Optional[str]:
        if rec.source == "env":
            return self._env[rec.id][1] if rec.id in self._env else None
        with self._lock:
            cached = self._opened.get(rec.id)
        if cached is not None:
            return cached
        try:
            secret = self.box.open(rec.ciphertext or b"", self._aad(rec.id, rec.provider))
        except SealedKeyError as exc:
            log.error("%s API key %s cannot be used and was disabled: %s", rec.provider, rec.fingerprint, exc)
            self.store.set_api_key_state(rec.id, "disabled", error=UNDECRYPTABLE)
            self._available = None
            return None
        with self._lock:
            self._opened[rec.id] = secret
        return secret

    def succeeded(self, lease: Lease, usage: Optional[Usage], user_id: str) -> None:
        """Record an answered request: its tokens (``usage``; None counts the request with no
        tokens) for the key, the user and the model. Raises StoreUnavailable."""
        now = self.clock()
        spec = self.catalogue.get(lease.model)
        zone = spec.day_resets if spec is not None else "UTC"
        self.store.record_api_usage(
            lease.key_id, user_id, lease.model, now=now, day=quota_day(now, zone), usage_day=utc_day(now),
            input_tokens=max(0, usage.input_tokens) if usage else 0,
            output_tokens=max(0, usage.output_tokens) if usage else 0,
        )

    def failed(self, lease: Lease, error: ProviderError) -> Optional[str]:
        """Apply what ``error`` means for the key (see the module docstring) and log one line
        with its fingerprint. Returns the key's new state when it changed (``"invalid"``),
        else None. Raises StoreUnavailable."""
        now = self.clock()
        kind = error.kind
        what = f"{lease.provider} API key {lease.fingerprint} ({lease.model})"
        try:
            if kind == "invalid_key":
                self.store.set_api_key_state(lease.key_id, "invalid", error=kind)
                self._available = None
                log.warning("%s was rejected as invalid and is now disabled: %s", what, error.detail or error)
                return "invalid"
            if kind == "rate_limited":
                wait = error.retry_after_s if error.retry_after_s else RATE_LIMIT_COOLDOWN_S
            elif kind == "quota_exhausted":
                spec = self.catalogue.get(lease.model)
                wait = max(error.retry_after_s or 0.0, seconds_to_next_day(now, spec.day_resets if spec else "UTC"))
            elif kind in ("server_error", "network_error"):
                wait = max(error.retry_after_s or 0.0, TRANSIENT_COOLDOWN_S)
            else:  # blocked, bad_request: the request, not the key
                log.info("%s: %s (%s)", what, kind, error.detail or error)
                return None
            wait = min(wait, MAX_COOLDOWN_S)
            self.store.cool_down_api_key(lease.key_id, now + wait, error=kind)
            log.warning("%s: %s; cooling down for %.0f s", what, kind, wait)
            return None
        except NotFound:  # removed meanwhile
            return None
