"""The worker protocol: every message, its validation, and tensor frames. No I/O.

Like the ``websockets`` library's sans-I/O layer (kept apart from its
``asyncio/connection.py``), this package is pure: it builds, encodes, decodes
and validates messages and tensor frames and raises typed errors. Sockets,
TLS, asyncio and timeouts belong to the daemon and its clients, which pass
``WEBSOCKET_OPTIONS`` to ``websockets.connect`` / ``websockets.serve``.

Two kinds of WebSocket message travel (RFC 6455 §5.6, data frames):

* text (opcode 0x1, UTF-8): one JSON *envelope* per message, see ``Message``,
  ``encode_message`` and ``decode_message``;
* binary (opcode 0x2): one *tensor frame* in this project's own format
  (magic ``b"ARGT"``), see ``encode_tensor`` and ``decode_tensor``.

Receiving (the decoders call ``check_frame_size`` before parsing)::

    msg = decode_message(text)                 # or decode_tensor(data) for a binary frame
    authorize(msg.message_type, peer_role)     # role from the peer's certificate, "joiner" if none
    handshake.received(msg.message_type)       # order of the opening messages
    ... handle; on any exception e: send encode_message(error_reply(e, network_id=...))

Decoders raise only ``ProtocolError`` subclasses, whose ``code`` is the
stable ``error`` reply code. Builders (``make_message``, ``encode_message``,
``encode_tensor``) raise ``ValueError``/``TypeError``: a message we fail to
build is our own bug and must be reported as ``internal``, never blamed on
the peer. ``docs/PROTOCOL.md`` describes the wire format for other readers.

One job per module, like websockets' ``src/websockets/`` (``exceptions.py``,
``frames.py``, ``protocol.py``, ...); import from ``worker.protocol``, which
re-exports every public name:

* ``errors``    — ``ProtocolError`` and one subclass per stable error code;
* ``limits``    — version, size and id limits, ``WEBSOCKET_OPTIONS``, ``check_frame_size``;
* ``schema``    — the payload schema language (``Field`` types, ``check_schema``), ``b64``;
* ``control``   — the control endpoint's commands and their argument schemas;
* ``messages``  — every message type: payload schema, session and tensor rules, senders (roles);
* ``envelope``  — ``Message``, its JSON text frame codec, replies and ``error`` replies;
* ``tensor``    — binary tensor frames;
* ``signing``   — the bytes a signature covers (canonical JSON, a signed config);
* ``handshake`` — the order of a connection's opening messages;
* ``units``     — sizes and durations in words (not protocol, but pure and shared).

Imports between them go one way: errors ← limits ← schema ← control ← messages
← envelope (which also uses tensor); signing and handshake stand alone. Nothing
here imports sockets, asyncio, websockets, threads or files
(``.importlinter`` holds that contract).
"""
from __future__ import annotations

from worker.protocol.control import CONTROL_COMMANDS
from worker.protocol.envelope import (
    ENVELOPE_FIELDS,
    Message,
    check_tensor_for,
    decode_frame,
    decode_message,
    encode_message,
    error_from_reply,
    error_reply,
    make_message,
    new_request_id,
    reply,
)
from worker.protocol.errors import (
    ERROR_CODES,
    ERROR_TYPES,
    ClockSkew,
    Conflict,
    FrameTooLarge,
    InternalError,
    InvalidPayload,
    MalformedFrame,
    NotAuthorized,
    NotFound,
    ProtocolError,
    UnexpectedMessage,
    UnknownMessageType,
    UnsupportedVersion,
)
from worker.protocol.handshake import Handshake
from worker.protocol.limits import (
    CHALLENGE_NONCE_BYTES,
    FRAME_LIMITS,
    ID_PATTERN,
    ID_RULE,
    MAX_CLOCK_SKEW_SECONDS,
    MAX_FRAME_BYTES,
    MAX_ID_CHARS,
    MAX_INPUT_IDS,
    MAX_JSON_FRAME_BYTES,
    MAX_JSON_INT,
    MAX_OBJECT_DEPTH,
    MAX_POSITION,
    MAX_TENSOR_FRAME_BYTES,
    MAX_TENSOR_NDIM,
    MAX_TOKEN_ID,
    MAX_TOTAL_LENGTH,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    SUPPORTED_VERSIONS,
    WEBSOCKET_OPTIONS,
    FrameKind,
    check_frame_size,
)
from worker.protocol.messages import (
    ADMIN,
    AUTHENTICATED_ROLES,
    BACKUP,
    BLOCK_RANGE,
    BLOCK_STATES,
    CONTROL,
    FORWARD_ROWS,
    JOINER,
    MAX_BLOCK_CHUNK,
    MAX_FORWARD_ROWS,
    MEMBER_ROLES,
    MESSAGE_TYPES,
    ROLES,
    SAMPLING_FIELDS,
    SESSION_FIELDS,
    WORKER,
    MessageSpec,
    Session,
    authorize,
    block_range_from_wire,
    block_range_to_wire,
    validate_payload,
)
from worker.protocol.schema import (
    B64,
    Bool,
    Field,
    FlatObject,
    Id,
    Int,
    IntList,
    JsonObject,
    Num,
    Record,
    RecordList,
    Str,
    b64,
    check_schema,
    unb64,
)
from worker.protocol.signing import canonical_json, config_signed_bytes
from worker.protocol.tensor import (
    TENSOR_ALIGN,
    TENSOR_DTYPES,
    TENSOR_HEADER_VERSION,
    TENSOR_MAGIC,
    TensorFrame,
    decode_tensor,
    encode_tensor,
    tensor_header_size,
)

__all__ = [
    # errors
    "ERROR_CODES", "ERROR_TYPES", "ClockSkew", "Conflict", "FrameTooLarge", "InternalError", "InvalidPayload",
    "MalformedFrame", "NotAuthorized", "NotFound", "ProtocolError", "UnexpectedMessage", "UnknownMessageType",
    "UnsupportedVersion",
    # limits
    "CHALLENGE_NONCE_BYTES", "FRAME_LIMITS", "FrameKind", "ID_PATTERN", "ID_RULE", "MAX_CLOCK_SKEW_SECONDS",
    "MAX_FRAME_BYTES", "MAX_ID_CHARS", "MAX_INPUT_IDS", "MAX_JSON_FRAME_BYTES", "MAX_JSON_INT", "MAX_OBJECT_DEPTH",
    "MAX_POSITION", "MAX_TENSOR_FRAME_BYTES", "MAX_TENSOR_NDIM", "MAX_TOKEN_ID", "MAX_TOTAL_LENGTH",
    "PROTOCOL_VERSION", "SUBPROTOCOL", "SUPPORTED_VERSIONS", "WEBSOCKET_OPTIONS", "check_frame_size",
    # schema
    "B64", "Bool", "Field", "FlatObject", "Id", "Int", "IntList", "JsonObject", "Num", "Record", "RecordList", "Str",
    "b64", "check_schema", "unb64",
    # control
    "CONTROL_COMMANDS",
    # messages
    "ADMIN", "AUTHENTICATED_ROLES", "BACKUP", "BLOCK_RANGE", "BLOCK_STATES", "CONTROL", "FORWARD_ROWS", "JOINER",
    "MAX_BLOCK_CHUNK", "MAX_FORWARD_ROWS", "MEMBER_ROLES", "MESSAGE_TYPES", "MessageSpec", "ROLES", "SAMPLING_FIELDS",
    "SESSION_FIELDS", "Session", "WORKER", "authorize", "block_range_from_wire", "block_range_to_wire",
    "validate_payload",
    # envelope
    "ENVELOPE_FIELDS", "Message", "check_tensor_for", "decode_frame", "decode_message", "encode_message",
    "error_from_reply", "error_reply", "make_message", "new_request_id", "reply",
    # tensor
    "TENSOR_ALIGN", "TENSOR_DTYPES", "TENSOR_HEADER_VERSION", "TENSOR_MAGIC", "TensorFrame", "decode_tensor",
    "encode_tensor", "tensor_header_size",
    # signing, handshake
    "canonical_json", "config_signed_bytes", "Handshake",
]
