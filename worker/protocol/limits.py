"""Protocol version, size and id limits, and the WebSocket options that enforce them.

The numbers every other protocol module checks against: frame sizes per kind
(``check_frame_size``), id rule, token and length bounds, clock skew. The daemon
and its clients pass ``WEBSOCKET_OPTIONS`` to ``websockets.connect`` /
``websockets.serve``; this module only names them (no I/O).
"""
from __future__ import annotations

import re
from typing import Any, Literal

from worker.protocol.errors import FrameTooLarge

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

MAX_JSON_FRAME_BYTES = 1 << 20  # 1 MiB: one text frame (an envelope), UTF-8 bytes
MAX_TENSOR_FRAME_BYTES = 64 << 20  # 64 MiB: one binary frame (header + data)
MAX_FRAME_BYTES = max(MAX_JSON_FRAME_BYTES, MAX_TENSOR_FRAME_BYTES)  # websockets has one limit for both
MAX_CLOCK_SKEW_SECONDS = 300.0  # |timestamp - receiver's clock| allowed; also the replay window
MAX_ID_CHARS = 64  # request, session, node and network ids
MAX_INPUT_IDS = 8192  # tokens in one inference_request
MAX_TOTAL_LENGTH = 16384  # inference_request.max_length: prompt + generated tokens
MAX_TOKEN_ID = (1 << 31) - 1  # token ids fit an int32
MAX_POSITION = (1 << 31) - 1
MAX_JSON_INT = (1 << 53) - 1  # integers every JSON reader holds exactly
MAX_OBJECT_DEPTH = 16  # nesting of free-form objects (config)
MAX_TENSOR_NDIM = 4

# Ids (request, session, node, network): the rule worker/pki.py applies to node and network ids
# in certificates, used for all ids: short, printable, no spaces or colons, safe in logs and paths.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ID_RULE = "1..64 characters of [A-Za-z0-9_.-], starting with a letter or digit"
CHALLENGE_NONCE_BYTES = 32  # worker/pki.py CHALLENGE_BYTES

SUBPROTOCOL = "argus.v1"  # Sec-WebSocket-Protocol (RFC 6455 §1.9, §11.3.4)

# Keyword arguments for websockets.asyncio.client.connect and .server.serve (websockets >= 13).
# compression=None: permessage-deflate (RFC 7692) costs CPU and saves little on float
# tensors, and compressing secrets next to attacker-chosen data inside TLS invites
# CRIME/BREACH-style length oracles. max_size is the larger of the two frame limits,
# because websockets has one limit for all messages; check_frame_size applies the
# per-kind limit after receipt, before parsing.
WEBSOCKET_OPTIONS: dict[str, Any] = {
    "compression": None,
    "max_size": MAX_FRAME_BYTES,
    "subprotocols": [SUBPROTOCOL],
    "ping_interval": 20.0,  # seconds
    "ping_timeout": 20.0,  # seconds without a pong before the connection is closed
    "close_timeout": 10.0,  # seconds
}

# Before authentication (issue 13, finding 9). A peer that has not yet proven a certificate of
# the network's CA (every peer during the opening, a joiner for its whole connection) gets
# small frames, a deadline and a share of a bounded number of connection slots; after the
# opening (worker/link.py accept) the frame limit rises to MAX_FRAME_BYTES.
MAX_PREAUTH_FRAME_BYTES = 64 << 10  # 64 KiB: one frame before authentication (close 1009 above it)
PREAUTH_OPEN_TIMEOUT_S = 10.0  # seconds for TLS + the HTTP upgrade (websockets' open_timeout)
HANDSHAKE_DEADLINE_S = 5.0  # seconds for the whole opening (hello … challenge_response) after the upgrade
JOIN_CONVERSATION_S = 30.0  # seconds from a joiner's upgrade to its join_request (no message extends it)
MAX_PREAUTH_PER_ADDRESS = 8  # connections not yet authenticated from one IP address (more: HTTP 503)
MAX_PREAUTH_TOTAL = 64  # connections without a certificate not yet authenticated, all addresses together
CLOSE_TOO_BIG = 1009  # WebSocket close code for a frame over the limit (RFC 6455 §7.4.1)

FrameKind = Literal["json", "tensor"]
FRAME_LIMITS: dict[str, int] = {"json": MAX_JSON_FRAME_BYTES, "tensor": MAX_TENSOR_FRAME_BYTES}


def check_frame_size(n_bytes: int, kind: FrameKind) -> None:
    """Raise FrameTooLarge if a frame of ``n_bytes`` exceeds the limit for ``kind``.

    Call it before parsing; ``kind`` is "json" (text frames) or "tensor" (binary frames).
    Raises ValueError for an unknown kind or a negative size.
    """
    limit = FRAME_LIMITS.get(kind)
    if limit is None or n_bytes < 0:
        raise ValueError(f"check_frame_size needs kind 'json' or 'tensor' and n_bytes >= 0, got {kind!r}, {n_bytes}")
    if n_bytes > limit:
        raise FrameTooLarge(f"{kind} frame of {n_bytes} bytes exceeds the limit of {limit} bytes")


__all__ = [
    "CHALLENGE_NONCE_BYTES", "CLOSE_TOO_BIG", "FRAME_LIMITS", "HANDSHAKE_DEADLINE_S", "JOIN_CONVERSATION_S",
    "MAX_PREAUTH_FRAME_BYTES", "MAX_PREAUTH_PER_ADDRESS", "MAX_PREAUTH_TOTAL",
    "PREAUTH_OPEN_TIMEOUT_S", "FrameKind", "ID_PATTERN", "ID_RULE", "MAX_CLOCK_SKEW_SECONDS",
    "MAX_FRAME_BYTES", "MAX_ID_CHARS", "MAX_INPUT_IDS", "MAX_JSON_FRAME_BYTES", "MAX_JSON_INT", "MAX_OBJECT_DEPTH",
    "MAX_POSITION", "MAX_TENSOR_FRAME_BYTES", "MAX_TENSOR_NDIM", "MAX_TOKEN_ID", "MAX_TOTAL_LENGTH",
    "PROTOCOL_VERSION", "SUBPROTOCOL", "SUPPORTED_VERSIONS", "WEBSOCKET_OPTIONS", "check_frame_size",
]
