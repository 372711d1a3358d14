"""API keys of the remote providers: the pool, its failover, and their encryption at rest.

* :mod:`argus.keys.secretbox`: AES-256-GCM sealing of admin-added keys (``ARGUS_SECRET_KEY``).
* :mod:`argus.keys.pool`: :class:`KeyPool`, rotation over a shared store, cooldowns, usage.
* :mod:`argus.keys.failover`: :class:`Failover`, one request's way through the keys.
* :mod:`argus.keys.redact`: a logging filter that replaces any known key by its fingerprint.
"""
from __future__ import annotations

from argus.keys.failover import Failover
from argus.keys.pool import KeyPool, KeyPoolError, Lease, UnknownKey, quota_day, utc_day
from argus.keys.secretbox import SealedKeyError, SecretBox, SecretKeyError, open_box

__all__ = [
    "Failover",
    "KeyPool",
    "KeyPoolError",
    "Lease",
    "SealedKeyError",
    "SecretBox",
    "SecretKeyError",
    "UnknownKey",
    "open_box",
    "quota_day",
    "utc_day",
]
