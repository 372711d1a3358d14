"""The bytes a signature covers: canonical JSON and the signed form of a network config.

``config_update.signature`` is the admin's signature (``worker.pki``) over
``config_signed_bytes``; both ends compute the same bytes from the same values,
so the signature survives the JSON round trip. Signing and verifying keys is
``worker.pki``'s job, not this module's.
"""
from __future__ import annotations

import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes a signature over a JSON value covers."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def config_signed_bytes(network_id: str, version: int, config: dict) -> bytes:
    """What ``config_update.signature`` signs (the admin's key): network, version and canonical config."""
    return b"argus-config-v1\x00" + network_id.encode() + b"\x00" + str(version).encode() + b"\x00" + canonical_json(config)


__all__ = ["canonical_json", "config_signed_bytes"]
