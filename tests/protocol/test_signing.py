"""Signed content (worker/protocol/signing.py): a config signature survives the JSON round trip."""
from __future__ import annotations

import base64

from worker.protocol import (
    canonical_json,
    config_signed_bytes,
    encode_message,
    make_message,
)

from tests.protocol.samples import (
    NET,
    NOW,
    decode,
)

def test_config_signature_survives_the_wire():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    config = {"z": 1, "a": {"y": [1.5, "é"], "b": None}}
    sig = base64.b64encode(key.sign(config_signed_bytes(NET, 5, config))).decode()
    m = decode(encode_message(make_message("config_update", {"config": config, "version": 5, "signature": sig},
                                           network_id=NET, timestamp=NOW)))
    p = m.payload
    key.public_key().verify(base64.b64decode(p["signature"]), config_signed_bytes(NET, p["version"], p["config"]))
    assert canonical_json({"b": 1, "a": 2}) == canonical_json({"a": 2, "b": 1}) == b'{"a":2,"b":1}'
