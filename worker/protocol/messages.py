"""The worker protocol: every message, its validation, and tensor frames. No I/O.

Like the ``websockets`` library's ``protocol.py`` (kept apart from its
``asyncio/connection.py``), this module is pure: it builds, encodes, decodes
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
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping, Optional, Union

import numpy as np

if TYPE_CHECKING:  # imported where used: importing worker.engine loads the tokenizer stack
    from worker.engine.block_range import BlockRange

# --------------------------------------------------------------------------- limits

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

FrameKind = Literal["json", "tensor"]
FRAME_LIMITS: dict[str, int] = {"json": MAX_JSON_FRAME_BYTES, "tensor": MAX_TENSOR_FRAME_BYTES}

# --------------------------------------------------------------------------- errors

ERROR_CODES: dict[str, str] = {
    "malformed_frame": "the frame is not a well-formed envelope or tensor frame",
    "unsupported_version": "protocol_version is not one this node speaks",
    "unknown_message_type": "message_type is not defined",
    "invalid_payload": "the payload does not match its message type's schema",
    "frame_too_large": "the frame exceeds the size limit for its kind",
    "clock_skew": "timestamp is outside the allowed window around the receiver's clock",
    "unexpected_message": "the message is valid but not allowed in the connection's current state",
    "not_authorized": "the sender's role may not send this message type, or a credential failed",
    "not_found": "the named node, session or resource does not exist here",
    "conflict": "the request conflicts with current state (e.g. a stale config version)",
    "internal": "the receiver failed; the details are in its log",
}


class ProtocolError(Exception):
    """A protocol failure that becomes an ``error`` reply with a stable ``code``.

    ``request_id`` is the offending message's request id when it could be read
    (decoders fill it in), so the reply can echo it; otherwise None.
    Raises ValueError for a code not in ``ERROR_CODES``.
    """

    def __init__(self, code: str, message: str, *, request_id: Optional[str] = None):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; add it to ERROR_CODES first")
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class _CodedError(ProtocolError):
    code: ClassVar[str]

    def __init__(self, message: str, *, request_id: Optional[str] = None):
        super().__init__(type(self).code, message, request_id=request_id)


class MalformedFrame(_CodedError):
    code = "malformed_frame"


class UnsupportedVersion(_CodedError):
    code = "unsupported_version"


class UnknownMessageType(_CodedError):
    code = "unknown_message_type"


class InvalidPayload(_CodedError):
    code = "invalid_payload"


class FrameTooLarge(_CodedError):
    code = "frame_too_large"


class ClockSkew(_CodedError):
    code = "clock_skew"


class UnexpectedMessage(_CodedError):
    code = "unexpected_message"


class NotAuthorized(_CodedError):
    code = "not_authorized"


class NotFound(_CodedError):
    code = "not_found"


class Conflict(_CodedError):
    code = "conflict"


class InternalError(_CodedError):
    code = "internal"


ERROR_TYPES: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (MalformedFrame, UnsupportedVersion, UnknownMessageType, InvalidPayload, FrameTooLarge,
                ClockSkew, UnexpectedMessage, NotAuthorized, NotFound, Conflict, InternalError)
}
assert set(ERROR_TYPES) == set(ERROR_CODES)


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


# --------------------------------------------------------------------------- roles

ADMIN, WORKER, BACKUP, JOINER, CONTROL = "admin", "worker", "backup", "joiner", "control"
MEMBER_ROLES = frozenset({ADMIN, WORKER, BACKUP})  # from the peer's certificate
# JOINER: a peer without a member certificate. CONTROL: the chat server (or the
# ``python -m worker`` CLI) on a daemon's local control endpoint, whose own CA
# issues only that role; network CAs never issue it.
ROLES = MEMBER_ROLES | {JOINER, CONTROL}
AUTHENTICATED_ROLES = MEMBER_ROLES | {CONTROL}  # roles that prove a key in the opening


# --------------------------------------------------------------------------- payload schemas
# A schema is a dict {key: Field}. Every key is required (null only where nullable),
# and keys not in the schema are rejected: new fields come with a new protocol_version.


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _show(v: Any, n: int = 40) -> str:
    """A short, log-safe rendering of a peer's value (arrays and objects by type only)."""
    if isinstance(v, str):
        r = repr(v[:n])
    elif v is None or isinstance(v, (bool, int, float)):
        r = repr(v)
    else:
        return f"an {_json_type(v)}" if _json_type(v)[0] in "aeiou" else f"a {_json_type(v)}"
    return r if len(r) <= n else r[: n - 3] + "..."


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates, which JSON escapes can carry
        return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_id(v: Any) -> bool:
    return isinstance(v, str) and ID_PATTERN.fullmatch(v) is not None


@dataclass(frozen=True, kw_only=True)
class Field:
    """One payload key's type and limits; ``check`` raises InvalidPayload naming ``where``."""

    nullable: bool = False

    def check(self, value: Any, where: str) -> None:
        if value is None:
            if not self.nullable:
                raise InvalidPayload(f"{where} must not be null")
            return
        self._check(value, where)

    def _check(self, value: Any, where: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Str(Field):
    max_len: int  # characters
    min_len: int = 1
    choices: tuple[str, ...] = ()
    prefix: str = ""

    def _check(self, value, where):
        if not isinstance(value, str):
            raise InvalidPayload(f"{where} must be a string, got {_json_type(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise InvalidPayload(f"{where} must have {self.min_len}..{self.max_len} characters, got {len(value)}")
        if not _utf8_ok(value):
            raise InvalidPayload(f"{where} contains a lone surrogate, which is not UTF-8")
        if self.choices and value not in self.choices:
            raise InvalidPayload(f"{where} must be one of {', '.join(self.choices)}; got {_show(value)}")
        if not value.startswith(self.prefix):
            raise InvalidPayload(f"{where} must start with {self.prefix!r}")


@dataclass(frozen=True, kw_only=True)
class Id(Field):
    """An id: see ``ID_PATTERN``."""

    def _check(self, value, where):
        if not _is_id(value):
            raise InvalidPayload(f"{where} must be {ID_RULE}; got {_show(value)}")


@dataclass(frozen=True, kw_only=True)
class Int(Field):
    lo: int = 0
    hi: int = MAX_JSON_INT

    def _check(self, value, where):
        if not _is_int(value):
            raise InvalidPayload(f"{where} must be an integer, got {_json_type(value)}")
        if not self.lo <= value <= self.hi:
            raise InvalidPayload(f"{where} must be in {self.lo}..{self.hi}, got {_show(value)}")


@dataclass(frozen=True, kw_only=True)
class Num(Field):
    """A finite JSON number (integer or float) in ``lo..hi``."""

    lo: float = 0.0
    hi: float = float(MAX_JSON_INT)

    def _check(self, value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidPayload(f"{where} must be a number, got {_json_type(value)}")
        if not self.lo <= value <= self.hi:
            raise InvalidPayload(f"{where} must be in {self.lo:g}..{self.hi:g}, got {_show(value)}")


@dataclass(frozen=True, kw_only=True)
class Bool(Field):
    def _check(self, value, where):
        if not isinstance(value, bool):
            raise InvalidPayload(f"{where} must be true or false, got {_json_type(value)}")


@dataclass(frozen=True, kw_only=True)
class B64(Field):
    """Standard base64 (RFC 4648 §4, with padding) of ``min_bytes..max_bytes`` bytes."""

    min_bytes: int = 1
    max_bytes: int = 1024

    def _check(self, value, where):
        if not isinstance(value, str):
            raise InvalidPayload(f"{where} must be a base64 string, got {_json_type(value)}")
        if len(value) > 4 * ((self.max_bytes + 2) // 3):
            raise InvalidPayload(f"{where} is longer than base64 of {self.max_bytes} bytes")
        try:
            raw = base64.b64decode(value.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error):
            raise InvalidPayload(f"{where} is not valid base64 (RFC 4648 alphabet with padding)") from None
        if not self.min_bytes <= len(raw) <= self.max_bytes:
            want = self.min_bytes if self.min_bytes == self.max_bytes else f"{self.min_bytes}..{self.max_bytes}"
            raise InvalidPayload(f"{where} must decode to {want} bytes, got {len(raw)}")


@dataclass(frozen=True, kw_only=True)
class IntList(Field):
    max_items: int
    min_items: int = 1
    lo: int = 0
    hi: int = MAX_JSON_INT

    def _check(self, value, where):
        if not isinstance(value, list):
            raise InvalidPayload(f"{where} must be an array of integers, got {_json_type(value)}")
        if not self.min_items <= len(value) <= self.max_items:
            raise InvalidPayload(f"{where} must have {self.min_items}..{self.max_items} items, got {len(value)}")
        for i, v in enumerate(value):
            if not _is_int(v) or not self.lo <= v <= self.hi:
                raise InvalidPayload(f"{where}[{i}] must be an integer in {self.lo}..{self.hi}, got {_show(v)}")


@dataclass(frozen=True, kw_only=True)
class FlatObject(Field):
    """An object of up to ``max_keys`` scalar values: string (≤ 256 chars), number, boolean or null."""

    max_keys: int = 64

    def _check(self, value, where):
        if not isinstance(value, dict):
            raise InvalidPayload(f"{where} must be an object, got {_json_type(value)}")
        if len(value) > self.max_keys:
            raise InvalidPayload(f"{where} has {len(value)} keys; the limit is {self.max_keys}")
        for k, v in value.items():
            if not isinstance(k, str) or not 1 <= len(k) <= MAX_ID_CHARS or not _utf8_ok(k):
                raise InvalidPayload(f"{where} key {_show(k)} must be 1..{MAX_ID_CHARS} UTF-8 characters")
            ok = (v is None or isinstance(v, bool) or (isinstance(v, float) and math.isfinite(v))
                  or (_is_int(v) and abs(v) <= MAX_JSON_INT)
                  or (isinstance(v, str) and len(v) <= 256 and _utf8_ok(v)))
            if not ok:
                raise InvalidPayload(f"{where}.{k} must be a string (≤ 256 chars), number (|n| < 2^53), boolean or null")


@dataclass(frozen=True, kw_only=True)
class JsonObject(Field):
    """A free-form JSON object nested at most ``max_depth`` levels: objects with string
    keys, arrays, UTF-8 strings, finite numbers, booleans, null."""

    max_depth: int = MAX_OBJECT_DEPTH

    def _check(self, value, where):
        if not isinstance(value, dict):
            raise InvalidPayload(f"{where} must be an object, got {_json_type(value)}")
        stack = [(value, 1)]
        while stack:
            v, depth = stack.pop()
            if depth > self.max_depth:
                raise InvalidPayload(f"{where} is nested deeper than {self.max_depth} levels")
            if isinstance(v, dict) and not all(isinstance(k, str) and _utf8_ok(k) for k in v):
                raise InvalidPayload(f"{where} has an object key that is not a UTF-8 string")
            for x in v.values() if isinstance(v, dict) else v:
                if isinstance(x, (dict, list)):
                    stack.append((x, depth + 1))
                elif not (x is None or isinstance(x, (bool, int)) or (isinstance(x, float) and math.isfinite(x))
                          or (isinstance(x, str) and _utf8_ok(x))):
                    raise InvalidPayload(f"{where} holds {_show(x)}, which is not a JSON value (or a lone surrogate)")


@dataclass(frozen=True, kw_only=True)
class Record(Field):
    """A nested object with its own schema (same rules as a payload)."""

    fields: Mapping[str, Field]

    def _check(self, value, where):
        check_schema(self.fields, value, where)


@dataclass(frozen=True, kw_only=True)
class RecordList(Field):
    """An array of ``min_items..max_items`` objects, each with the schema ``fields``."""

    fields: Mapping[str, Field]
    max_items: int
    min_items: int = 0

    def _check(self, value, where):
        if not isinstance(value, list):
            raise InvalidPayload(f"{where} must be an array of objects, got {_json_type(value)}")
        if not self.min_items <= len(value) <= self.max_items:
            raise InvalidPayload(f"{where} must have {self.min_items}..{self.max_items} items, got {len(value)}")
        for i, v in enumerate(value):
            check_schema(self.fields, v, f"{where}[{i}]")


def check_schema(schema: Mapping[str, Field], obj: Any, where: str = "payload") -> None:
    """Raise InvalidPayload unless ``obj`` is an object with exactly ``schema``'s keys, each valid."""
    if not isinstance(obj, dict):
        raise InvalidPayload(f"{where} must be an object, got {_json_type(obj)}")
    unknown = sorted(k for k in obj if k not in schema)
    if unknown:
        raise InvalidPayload(f"{where} has unknown field(s) {', '.join(_show(k, 30) for k in unknown[:5])}")
    for key, f in schema.items():
        if key not in obj:
            raise InvalidPayload(f"{where}.{key} is missing")
        f.check(obj[key], f"{where}.{key}")


# The wire form of worker.engine.block_range.BlockRange: blocks [start, end) of a model with `total` blocks.
BLOCK_RANGE = Record(fields={
    "model_id": Str(max_len=256),
    "start": Int(hi=MAX_POSITION),
    "end": Int(hi=MAX_POSITION),
    "total": Int(hi=MAX_POSITION),
})


def block_range_to_wire(r: "BlockRange") -> dict:
    return {"model_id": r.model_id, "start": r.start, "end": r.end, "total": r.total}


def block_range_from_wire(d: Mapping[str, Any]) -> "BlockRange":
    """The BlockRange of a validated payload's ``block_range`` (ValueError if it is empty or out of bounds)."""
    from worker.engine.block_range import BlockRange

    return BlockRange(d["model_id"], d["start"], d["end"], d["total"])


def _valid_block_range(p: dict) -> None:
    r = p.get("block_range")
    if r is not None and not 0 <= r["start"] < r["end"] <= r["total"]:
        raise InvalidPayload(f"payload.block_range [{r['start']}, {r['end']}) is empty or outside the model's {r['total']} blocks")


def _valid_inference_request(p: dict) -> None:
    n, mask = len(p["input_ids"]), p["attention_mask"]
    if mask is not None and len(mask) != n:
        raise InvalidPayload(f"payload.attention_mask has {len(mask)} items; input_ids has {n}")
    if p["max_length"] <= n:
        raise InvalidPayload(f"payload.max_length ({p['max_length']}) must exceed the {n} input ids")


def _valid_inference_response(p: dict) -> None:
    if p["done"] != (p["finish_reason"] is not None):
        raise InvalidPayload("payload.finish_reason must be set exactly when done is true")


# --------------------------------------------------------------------------- message types

Session = Literal["required", "optional", "absent"]


@dataclass(frozen=True)
class MessageSpec:
    """What a message type carries and who may send it.

    ``session``: whether the envelope's session_id must be set ("required"),
    may be ("optional") or must be null ("absent"). ``tensor``: one binary
    tensor frame with the same request_id and session_id follows the message.
    ``check``: cross-field rules run after the schema.
    """

    senders: frozenset[str]
    fields: Mapping[str, Field] = field(default_factory=dict)
    session: Session = "absent"
    tensor: bool = False
    check: Optional[Callable[[dict], None]] = None


_PEM_MAX = 16384
_NONCE = B64(min_bytes=CHALLENGE_NONCE_BYTES, max_bytes=CHALLENGE_NONCE_BYTES)
_SIGNATURE = B64(min_bytes=1, max_bytes=256)  # ECDSA P-256: DER ≤ 72 bytes, raw r||s 64 bytes
_ANY = ROLES
_MEMBERS = MEMBER_ROLES

_AUTH = AUTHENTICATED_ROLES

# The control endpoint's commands (the chat server → its local daemon): name → args
# schema. The client sends every key (null where the caller gave none); results are
# free-form JSON objects described in docs/PROTOCOL.md.
_NET = Id()
CONTROL_COMMANDS: dict[str, dict[str, Field]] = {
    "network_create": {"name": Str(max_len=64), "auto_approve": Bool(nullable=True),
                       "port": Int(hi=65535, nullable=True)},
    "network_list": {},
    "network_discover": {"timeout_ms": Int(lo=1, hi=30_000, nullable=True)},
    "network_join": {"token": Str(max_len=2048)},
    "network_leave": {"network_id": _NET},
    "network_status": {"network_id": _NET},
    "network_set": {"network_id": _NET, "auto_approve": Bool(nullable=True)},
    "token_issue": {"network_id": _NET, "ttl_s": Int(lo=1, hi=7 * 86400, nullable=True)},
    "workers_list": {"network_id": _NET},
    "worker_approve": {"network_id": _NET, "node_id": Id()},
    "worker_reject": {"network_id": _NET, "node_id": Id()},
    "worker_allocate": {"network_id": _NET, "node_id": Id(), "cpu_share": Num(lo=0.0, hi=1.0, nullable=True),
                        "ram_bytes": Int(nullable=True), "disk_bytes": Int(nullable=True)},
    "worker_remove": {"network_id": _NET, "node_id": Id()},
    "events": {"network_id": Id(nullable=True), "limit": Int(lo=1, hi=1000, nullable=True)},
    # issue 6: placement, block distribution, sessions (admin only)
    "placement_plan": {"network_id": _NET},
    "placement_apply": {"network_id": _NET},
    "distribution_status": {"network_id": _NET},
    "sessions_list": {"network_id": _NET},
    "session_drop": {"network_id": _NET, "session_id": Id()},
}


def _valid_control(p: dict) -> None:
    schema = CONTROL_COMMANDS.get(p["command"])
    if schema is None:
        raise InvalidPayload(f"control command {_show(p['command'])} is not defined; "
                             f"known: {', '.join(sorted(CONTROL_COMMANDS))}")
    check_schema(schema, p["args"], where="args")


MAX_FORWARD_ROWS = 64  # sessions batched into one forward
MAX_BLOCK_CHUNK = 8 << 20  # bytes of shard data in one blocks_chunk frame
BLOCK_STATES = ("need", "receiving", "verified", "loaded", "failed")
SAMPLING_FIELDS = {
    "temperature": Num(lo=0.0, hi=5.0, nullable=True), "top_p": Num(lo=0.0, hi=1.0, nullable=True),
    "top_k": Int(lo=0, hi=MAX_TOKEN_ID, nullable=True), "seed": Int(nullable=True),
    "repetition_penalty": Num(lo=0.01, hi=10.0, nullable=True), "ignore_eos": Bool(nullable=True),
}
# One row of a (batched) forward: positions start_pos .. start_pos+n_tokens-1 of one session,
# with the token ids of those positions (paged KV caches record them, so a resumed session is checked).
FORWARD_ROWS = RecordList(fields={
    "session_id": Id(), "start_pos": Int(hi=MAX_TOTAL_LENGTH), "n_tokens": Int(lo=1, hi=MAX_INPUT_IDS),
    "token_ids": IntList(max_items=MAX_INPUT_IDS, hi=MAX_TOKEN_ID),
}, min_items=1, max_items=MAX_FORWARD_ROWS)
SESSION_FIELDS = {
    "session_id": Str(max_len=128), "n_tokens": Int(), "bytes": Int(), "saved_at": Num(lo=0.0, nullable=True),
    "in_memory": Bool(), "block_range": Str(max_len=64, min_len=0),
}


def _valid_forward(p: dict) -> None:
    _valid_block_range(p)
    seen = set()
    for i, r in enumerate(p["rows"]):
        if len(r["token_ids"]) != r["n_tokens"]:
            raise InvalidPayload(f"payload.rows[{i}].token_ids has {len(r['token_ids'])} ids; n_tokens is {r['n_tokens']}")
        if r["session_id"] in seen:
            raise InvalidPayload(f"payload.rows[{i}]: session {r['session_id']} appears twice in one forward")
        seen.add(r["session_id"])


MESSAGE_TYPES: dict[str, MessageSpec] = {
    # opening of a member connection (see Handshake): hello, a challenge each way, a response each way
    "hello": MessageSpec(_AUTH, {
        "node_id": Id(), "role": Str(max_len=16, choices=tuple(sorted(AUTHENTICATED_ROLES))),
        "version": Str(max_len=64), "resources": FlatObject(),
    }),
    "challenge": MessageSpec(_AUTH, {"nonce": _NONCE}),
    "challenge_response": MessageSpec(_AUTH, {"signature": _SIGNATURE}),
    # joining: a peer without a member certificate first asks for the network CA
    # (to check it against the fingerprint in its token before revealing the token),
    # then asks the admin for a certificate
    "join_hello": MessageSpec(frozenset({JOINER})),
    "join_ca": MessageSpec(frozenset({ADMIN}), {
        "ca_pem": Str(max_len=_PEM_MAX, prefix="-----BEGIN CERTIFICATE-----"), "admin_node_id": Id(),
    }),
    "join_request": MessageSpec(frozenset({JOINER}), {
        "token": Str(max_len=2048),  # pki.issue_join_token: about 300 characters
        "csr_pem": Str(max_len=_PEM_MAX, prefix="-----BEGIN CERTIFICATE REQUEST-----"),
        "node_id": Id(), "address": Str(max_len=300),  # where the joiner's own network server listens
        "resources": FlatObject(),
    }),
    "join_pending": MessageSpec(frozenset({ADMIN})),
    "join_approved": MessageSpec(frozenset({ADMIN}), {
        "certificate_pem": Str(max_len=_PEM_MAX, prefix="-----BEGIN CERTIFICATE-----"),
        "ca_pem": Str(max_len=_PEM_MAX, prefix="-----BEGIN CERTIFICATE-----"),
        "config": JsonObject(),
    }),
    "join_rejected": MessageSpec(frozenset({ADMIN}), {"reason": Str(max_len=1024)}),
    # membership and configuration
    "heartbeat": MessageSpec(frozenset({ADMIN, WORKER, BACKUP}), {
        "resources": FlatObject(), "config_version": Int(),
    }),
    "config_update": MessageSpec(frozenset({ADMIN}), {
        "config": JsonObject(), "version": Int(lo=1), "signature": _SIGNATURE,
    }),
    "config_ack": MessageSpec(frozenset({WORKER, BACKUP}), {"version": Int(lo=1)}),
    "member_remove": MessageSpec(frozenset({ADMIN}), {"node_id": Id()}),
    "status_request": MessageSpec(frozenset({ADMIN})),
    "status_response": MessageSpec(_MEMBERS, {
        "node_id": Id(), "role": Str(max_len=16, choices=tuple(sorted(MEMBER_ROLES))),
        "version": Str(max_len=64), "config_version": Int(), "resources": FlatObject(),
        "block_range": Record(fields=BLOCK_RANGE.fields, nullable=True), "sessions": Int(),
    }, check=_valid_block_range),
    "leave": MessageSpec(frozenset({WORKER, BACKUP})),
    # inference: the chat server asks its daemon (control link); the admin daemon answers
    "inference_request": MessageSpec(frozenset({ADMIN, CONTROL}), {
        "input_ids": IntList(max_items=MAX_INPUT_IDS, hi=MAX_TOKEN_ID),
        "attention_mask": IntList(max_items=MAX_INPUT_IDS, lo=0, hi=1, nullable=True),
        "max_length": Int(lo=2, hi=MAX_TOTAL_LENGTH),
        "sampling": Record(fields=SAMPLING_FIELDS, nullable=True),
    }, session="required", check=_valid_inference_request),
    "inference_response": MessageSpec(frozenset({ADMIN, WORKER}), {
        "token_id": Int(hi=MAX_TOKEN_ID, nullable=True), "text": Str(max_len=4096, min_len=0),
        "done": Bool(), "finish_reason": Str(max_len=16, choices=("stop", "length", "cancelled"), nullable=True),
        "usage": FlatObject(nullable=True),
    }, session="required", check=_valid_inference_response),
    "inference_cancel": MessageSpec(frozenset({ADMIN, CONTROL}), session="required"),
    # stages: the admin drives every stage of the chain over the member links (client-orchestrated)
    "forward": MessageSpec(frozenset({ADMIN}), {
        "block_range": BLOCK_RANGE, "rows": FORWARD_ROWS,
    }, session="required", tensor=True, check=_valid_forward),
    "forward_result": MessageSpec(frozenset({WORKER}), {
        "block_range": BLOCK_RANGE, "rows": FORWARD_ROWS,
    }, session="required", tensor=True, check=_valid_forward),
    "session_query": MessageSpec(frozenset({ADMIN}), {
        "token_ids": IntList(max_items=MAX_TOTAL_LENGTH, min_items=0, hi=MAX_TOKEN_ID),
    }, session="required"),
    "session_save": MessageSpec(frozenset({ADMIN}), session="required"),
    "session_drop": MessageSpec(frozenset({ADMIN}), session="required"),
    "session_info": MessageSpec(frozenset({WORKER}), {
        "cached_tokens": Int(hi=MAX_TOTAL_LENGTH), "n_tokens": Int(hi=MAX_TOTAL_LENGTH), "saved": Bool(),
    }, session="required"),
    "sessions_request": MessageSpec(frozenset({ADMIN})),
    "sessions_response": MessageSpec(frozenset({WORKER}), {
        "sessions": RecordList(fields=SESSION_FIELDS, max_items=1000),
    }),
    # block distribution: the admin sends a worker the tensors of its range (docs/PROTOCOL.md)
    "blocks_offer": MessageSpec(frozenset({ADMIN}), {
        "epoch": Int(), "model_sha256": Str(max_len=64, min_len=64), "block_range": BLOCK_RANGE,
        "shard_sha256": Str(max_len=64, min_len=64), "shard_bytes": Int(lo=1), "chunk_bytes": Int(lo=1, hi=MAX_BLOCK_CHUNK),
    }, check=_valid_block_range),
    "blocks_chunk": MessageSpec(frozenset({ADMIN}), {
        "shard_sha256": Str(max_len=64, min_len=64), "offset": Int(), "sha256": Str(max_len=64, min_len=64),
    }, session="required", tensor=True),
    "blocks_status": MessageSpec(frozenset({WORKER}), {
        "shard_sha256": Str(max_len=64, min_len=64), "have_bytes": Int(),
        "state": Str(max_len=16, choices=BLOCK_STATES), "message": Str(max_len=1024, min_len=0),
    }, session="optional"),
    # the local control endpoint
    "control": MessageSpec(frozenset({CONTROL}), {
        "command": Str(max_len=64), "args": JsonObject(),
    }, check=_valid_control),
    "control_result": MessageSpec(frozenset({ADMIN}), {"result": JsonObject()}),
    "error": MessageSpec(_ANY, {
        "code": Str(max_len=64, choices=tuple(ERROR_CODES)), "message": Str(max_len=1024),
        "request_id": Id(nullable=True),
    }, session="optional"),
}


def validate_payload(message_type: str, payload: Any) -> None:
    """Raise UnknownMessageType or InvalidPayload unless ``payload`` fits ``message_type``'s schema."""
    spec = MESSAGE_TYPES.get(message_type)
    if spec is None:
        raise UnknownMessageType(f"message_type {_show(message_type)} is not defined")
    check_schema(spec.fields, payload)
    if spec.check is not None:
        spec.check(payload)


def authorize(message_type: str, role: str) -> None:
    """Raise NotAuthorized unless a peer with ``role`` may send ``message_type``.

    ``role`` comes from the peer's certificate ("admin", "worker", "backup"),
    or is "joiner" for a peer without one. Unknown types raise UnknownMessageType.
    """
    spec = MESSAGE_TYPES.get(message_type)
    if spec is None:
        raise UnknownMessageType(f"message_type {_show(message_type)} is not defined")
    if role not in spec.senders:
        raise NotAuthorized(f"role {_show(role)} may not send {message_type}; allowed: {', '.join(sorted(spec.senders))}")


# --------------------------------------------------------------------------- envelope

ENVELOPE_FIELDS = ("protocol_version", "message_type", "request_id", "network_id", "session_id", "timestamp", "payload")


@dataclass(frozen=True)
class Message:
    """One envelope. ``timestamp`` is UNIX seconds (float); ``payload`` is plain JSON data."""

    message_type: str
    request_id: str
    network_id: str
    session_id: Optional[str]
    timestamp: float
    payload: dict
    protocol_version: int = PROTOCOL_VERSION
    #: the tensor frame that followed a ``tensor=True`` message on a link (never encoded)
    tensor: Optional["TensorFrame"] = field(default=None, compare=False, repr=False)

    @property
    def spec(self) -> MessageSpec:
        return MESSAGE_TYPES[self.message_type]

    def to_wire(self) -> dict:
        return {k: getattr(self, k) for k in ENVELOPE_FIELDS}


def new_request_id() -> str:
    """A fresh random request id (32 hex characters)."""
    return uuid.uuid4().hex


def _check_envelope(m: Message) -> None:
    """Raise ProtocolError unless ``m``'s fields are valid (timestamp skew not checked)."""
    if not _is_int(m.protocol_version):
        raise MalformedFrame(f"protocol_version must be an integer, got {_json_type(m.protocol_version)}")
    if m.protocol_version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(
            f"protocol_version {_show(m.protocol_version)} is not supported; this node speaks {sorted(SUPPORTED_VERSIONS)}")
    if not isinstance(m.message_type, str):
        raise MalformedFrame(f"message_type must be a string, got {_json_type(m.message_type)}")
    spec = MESSAGE_TYPES.get(m.message_type)
    if spec is None:
        raise UnknownMessageType(f"message_type {_show(m.message_type)} is not defined")
    for name in ("request_id", "network_id"):
        if not _is_id(getattr(m, name)):
            raise MalformedFrame(f"{name} must be {ID_RULE}; got {_show(getattr(m, name))}")
    if m.session_id is not None and not _is_id(m.session_id):
        raise MalformedFrame(f"session_id must be null or {ID_RULE}; got {_show(m.session_id)}")
    ts = m.timestamp
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not 0 <= ts <= MAX_JSON_INT:
        raise MalformedFrame(f"timestamp must be a non-negative number of UNIX seconds, got {_show(ts)}")
    if spec.session == "required" and m.session_id is None:
        raise InvalidPayload(f"{m.message_type} needs a session_id")
    if spec.session == "absent" and m.session_id is not None:
        raise InvalidPayload(f"{m.message_type} must not carry a session_id")
    validate_payload(m.message_type, m.payload)


def make_message(
    message_type: str,
    payload: Optional[dict] = None,
    *,
    network_id: str,
    request_id: Optional[str] = None,
    session_id: Optional[str] = None,
    timestamp: Optional[float] = None,
) -> Message:
    """A validated message; ``request_id`` defaults to a fresh one, ``timestamp`` to now.

    Raises ValueError (naming the field and the reason) if the result would not validate.
    """
    m = Message(
        message_type, new_request_id() if request_id is None else request_id, network_id, session_id,
        time.time() if timestamp is None else float(timestamp), {} if payload is None else payload,
    )
    try:
        _check_envelope(m)
    except ProtocolError as e:
        raise ValueError(f"cannot build {message_type}: {e.message}") from e
    return m


def reply(to: Message, message_type: str, payload: Optional[dict] = None, *, timestamp: Optional[float] = None) -> Message:
    """A message answering ``to``: same request_id and network_id, and its session_id where allowed."""
    spec = MESSAGE_TYPES.get(message_type)
    session = to.session_id if spec is not None and spec.session != "absent" else None
    return make_message(message_type, payload, network_id=to.network_id, request_id=to.request_id,
                        session_id=session, timestamp=timestamp)


def encode_message(m: Message) -> str:
    """The JSON text of ``m`` for one text frame (RFC 6455 opcode 0x1): compact, UTF-8, ≤ 1 MiB.

    Raises ValueError if ``m`` does not validate or encodes larger than MAX_JSON_FRAME_BYTES.
    """
    try:
        _check_envelope(m)
    except ProtocolError as e:
        raise ValueError(f"cannot encode {_show(m.message_type)}: {e.message}") from e
    text = json.dumps(m.to_wire(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    n = len(text.encode("utf-8"))
    if n > MAX_JSON_FRAME_BYTES:
        raise ValueError(f"{m.message_type} encodes to {n} bytes; the limit is {MAX_JSON_FRAME_BYTES}")
    return text


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key in object")
    return d


def _finite_float(s: str) -> float:
    x = float(s)
    if not math.isfinite(x):
        raise ValueError(f"number {s[:20]} is out of range")
    return x


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_message(
    frame: Union[str, bytes, bytearray, memoryview],
    *,
    now: Optional[float] = None,
    max_skew: Optional[float] = MAX_CLOCK_SKEW_SECONDS,
) -> Message:
    """Parse and validate one text frame into a Message.

    ``frame`` is the text (or its UTF-8 bytes). ``now`` is the receiver's clock
    in UNIX seconds (default: time.time()); a timestamp more than ``max_skew``
    seconds away raises ClockSkew (``max_skew=None`` skips the check).
    Raises FrameTooLarge, MalformedFrame (not UTF-8/JSON, duplicate keys, NaN,
    envelope fields missing, unknown or mistyped), UnsupportedVersion,
    UnknownMessageType, ClockSkew or InvalidPayload, with ``request_id`` set
    when the envelope's request_id was readable. Never anything else.
    """
    if isinstance(frame, str):
        check_frame_size(len(frame) if frame.isascii() else len(frame.encode("utf-8", "surrogatepass")), "json")
        text = frame
    else:
        check_frame_size(len(frame), "json")
        try:
            text = bytes(frame).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MalformedFrame(f"text frame is not UTF-8 (RFC 6455 §5.6): byte {e.start}") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_float=_finite_float,
                         parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise MalformedFrame(f"frame is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(obj, dict):
        raise MalformedFrame(f"frame must be a JSON object, got {_json_type(obj)}")
    rid = obj.get("request_id")
    try:
        version = obj.get("protocol_version")
        if not _is_int(version):
            raise MalformedFrame(f"protocol_version must be an integer, got {_json_type(version)}")
        if version not in SUPPORTED_VERSIONS:  # before the fields: a newer peer's envelope may have new ones
            raise UnsupportedVersion(
                f"protocol_version {_show(version)} is not supported; this node speaks {sorted(SUPPORTED_VERSIONS)}")
        unknown = sorted(k for k in obj if k not in ENVELOPE_FIELDS)
        if unknown:
            raise MalformedFrame(f"unknown envelope field(s) {', '.join(_show(k, 30) for k in unknown[:5])}")
        missing = [k for k in ENVELOPE_FIELDS if k not in obj]
        if missing:
            raise MalformedFrame(f"envelope field(s) {', '.join(missing)} missing")
        m = Message(**obj)
        _check_envelope(m)
        if max_skew is not None:
            clock = time.time() if now is None else now
            if abs(m.timestamp - clock) > max_skew:
                raise ClockSkew(f"timestamp is {m.timestamp - clock:+.6g} s from this node's clock; "
                                f"the limit is ±{max_skew:g} s (check NTP on both nodes)")
    except ProtocolError as e:
        e.request_id = rid if _is_id(rid) else None
        raise
    if isinstance(m.timestamp, int):
        m = Message(**{**m.to_wire(), "timestamp": float(m.timestamp)})
    return m


def error_reply(
    exc: BaseException,
    request_id: Optional[str] = None,
    *,
    network_id: str,
    session_id: Optional[str] = None,
    timestamp: Optional[float] = None,
) -> Message:
    """The ``error`` message answering the request that raised ``exc``.

    ``request_id`` defaults to ``exc.request_id`` (set by the decoders); when
    none is known (the frame was unreadable) the payload's request_id is null
    and the envelope gets a fresh id. A ProtocolError keeps its code and
    message; any other exception becomes ``internal`` with a generic message
    (details stay in the log, not on the wire). Never raises for a valid
    ``network_id``.
    """
    if request_id is None and isinstance(exc, ProtocolError):
        request_id = exc.request_id
    if not _is_id(request_id):
        request_id = None
    if isinstance(exc, ProtocolError) and exc.code in ERROR_CODES:
        code, message = exc.code, exc.message
    else:
        code, message = "internal", "The node failed to handle this request; its log has the details."
    if len(message) > 1024:
        message = message[:1021] + "..."
    if not _utf8_ok(message):
        message = message.encode("utf-8", "replace").decode("utf-8")
    return make_message(
        "error", {"code": code, "message": message, "request_id": request_id},
        network_id=network_id, request_id=request_id or new_request_id(),
        session_id=session_id if _is_id(session_id) else None, timestamp=timestamp,
    )


def error_from_reply(m: Message) -> ProtocolError:
    """The typed ProtocolError an ``error`` message reports (to raise on the requesting side)."""
    p = m.payload
    return ERROR_TYPES[p["code"]](p["message"], request_id=p["request_id"])


# --------------------------------------------------------------------------- signed content


def b64(data: bytes) -> str:
    """Standard base64 with padding (RFC 4648 §4), the encoding of B64 fields."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Bytes of a B64 field that already passed validation (ValueError otherwise)."""
    return base64.b64decode(text.encode("ascii"), validate=True)


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes a signature over a JSON value covers."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def config_signed_bytes(network_id: str, version: int, config: dict) -> bytes:
    """What ``config_update.signature`` signs (the admin's key): network, version and canonical config."""
    return b"argus-config-v1\x00" + network_id.encode() + b"\x00" + str(version).encode() + b"\x00" + canonical_json(config)


# --------------------------------------------------------------------------- tensor frames
# Layout (all integers little-endian), the project's own format:
#   0      4        magic b"ARGT"
#   4      1        header version (1)
#   5      1        dtype code (TENSOR_DTYPES)
#   6      1        ndim (0..4)
#   7      4*ndim   shape, u32 each
#   ..     1        session id length S (1..64), then S bytes UTF-8 session id
#   ..     8        step, u64
#   ..     1        request id length R (1..64), then R bytes UTF-8 request id
#   ..     0..7     zero padding, so the data starts at a multiple of 8
#   ..     N        data: prod(shape) * itemsize bytes, C order; nothing after it

TENSOR_MAGIC = b"ARGT"
TENSOR_HEADER_VERSION = 1
TENSOR_ALIGN = 8
TENSOR_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # f32
    2: np.dtype("<f2"),  # f16
    3: np.dtype("<i4"),  # i32
    4: np.dtype("<i8"),  # i64
    5: np.dtype("u1"),  # u8
}
_DTYPE_CODES = {dt: code for code, dt in TENSOR_DTYPES.items()}
_PREFIX = struct.Struct("<4sBBB")  # magic, header version, dtype code, ndim
_U8, _U64 = struct.Struct("<B"), struct.Struct("<Q")


@dataclass(frozen=True)
class TensorFrame:
    """A decoded tensor frame. ``array`` is a read-only view into the frame's bytes (no copy)."""

    array: np.ndarray
    session_id: str
    step: int
    request_id: str


def tensor_header_size(ndim: int, session_id: str, request_id: str) -> int:
    """Bytes before the data, padding included (a multiple of TENSOR_ALIGN)."""
    n = _PREFIX.size + 4 * ndim + 1 + len(session_id.encode()) + _U64.size + 1 + len(request_id.encode())
    return -(-n // TENSOR_ALIGN) * TENSOR_ALIGN


def encode_tensor(array: np.ndarray, session_id: str, step: int, request_id: str) -> bytes:
    """One binary frame (RFC 6455 opcode 0x2) carrying ``array``; see the layout above.

    ``array``: float32, float16, int32, int64 or uint8, 0..4 dimensions, any
    byte order or strides (sent little-endian, C order). ``step``: 0 ≤ step < 2**64.
    Ids: see ``ID_PATTERN``.
    Raises TypeError for another dtype, ValueError for other bad arguments or a
    frame over MAX_TENSOR_FRAME_BYTES.
    """
    a = np.asarray(array)
    code = _DTYPE_CODES.get(a.dtype.newbyteorder("<"))
    if code is None:
        raise TypeError(f"tensor dtype {a.dtype} is not one of float32, float16, int32, int64, uint8; cast it first")
    if a.ndim > MAX_TENSOR_NDIM:
        raise ValueError(f"tensor has {a.ndim} dimensions; the limit is {MAX_TENSOR_NDIM}")
    for name, v in (("session_id", session_id), ("request_id", request_id)):
        if not _is_id(v):
            raise ValueError(f"{name} must be {ID_RULE}; got {_show(v)}")
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or not 0 <= step < 1 << 64:
        raise ValueError(f"step must be an integer in 0..2**64-1, got {_show(step)}")
    if any(d >= 1 << 32 for d in a.shape):
        raise ValueError(f"tensor dimension {max(a.shape)} does not fit a u32")
    a = np.asarray(a, dtype=TENSOR_DTYPES[code], order="C")  # keeps 0-d (ascontiguousarray would not)
    sid, rid = session_id.encode(), request_id.encode()
    head = b"".join((
        _PREFIX.pack(TENSOR_MAGIC, TENSOR_HEADER_VERSION, code, a.ndim),
        struct.pack(f"<{a.ndim}I", *a.shape),
        _U8.pack(len(sid)), sid, _U64.pack(int(step)), _U8.pack(len(rid)), rid,
    ))
    head += b"\x00" * (-len(head) % TENSOR_ALIGN)
    if len(head) + a.nbytes > MAX_TENSOR_FRAME_BYTES:
        raise ValueError(f"tensor frame of {len(head) + a.nbytes} bytes exceeds the limit of {MAX_TENSOR_FRAME_BYTES}")
    return b"".join((head, memoryview(a)))  # one copy: header and data into the frame


def decode_tensor(frame: Union[bytes, bytearray, memoryview]) -> TensorFrame:
    """Parse one binary frame into a TensorFrame whose array views ``frame`` (read-only, no copy).

    Raises FrameTooLarge over MAX_TENSOR_FRAME_BYTES, otherwise MalformedFrame
    for any inconsistency: short frame, bad magic or header version, unknown
    dtype code, ndim > 4, bad id length or characters, non-zero padding, data
    length other than prod(shape) * itemsize (no trailing bytes). Never
    anything else. ``request_id`` is set on the error once it was read.
    """
    mv = memoryview(frame).cast("B") if not isinstance(frame, bytes) else memoryview(frame)
    n = len(mv)
    check_frame_size(n, "tensor")
    if n < _PREFIX.size:
        raise MalformedFrame(f"tensor frame of {n} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, version, code, ndim = _PREFIX.unpack_from(mv, 0)
    if magic != TENSOR_MAGIC:
        raise MalformedFrame(f"tensor frame starts with {bytes(magic)!r}, not {TENSOR_MAGIC!r}")
    if version != TENSOR_HEADER_VERSION:
        raise MalformedFrame(f"tensor header version {version} is not supported (this node reads {TENSOR_HEADER_VERSION})")
    dtype = TENSOR_DTYPES.get(code)
    if dtype is None:
        raise MalformedFrame(f"tensor dtype code {code} is not defined (known: {sorted(TENSOR_DTYPES)})")
    if ndim > MAX_TENSOR_NDIM:
        raise MalformedFrame(f"tensor ndim {ndim} exceeds {MAX_TENSOR_NDIM}")
    pos = _PREFIX.size
    if n < pos + 4 * ndim:
        raise MalformedFrame(f"tensor frame of {n} bytes ends inside its shape")
    shape = struct.unpack_from(f"<{ndim}I", mv, pos)
    pos += 4 * ndim
    session_id, pos = _read_id(mv, pos, "session id")
    if n < pos + _U64.size:
        raise MalformedFrame(f"tensor frame of {n} bytes ends inside its step")
    (step,) = _U64.unpack_from(mv, pos)
    pos += _U64.size
    request_id, pos = _read_id(mv, pos, "request id")
    try:
        pad = -pos % TENSOR_ALIGN
        if n < pos + pad:
            raise MalformedFrame(f"tensor frame of {n} bytes ends inside its padding")
        if any(mv[pos:pos + pad]):
            raise MalformedFrame("tensor header padding must be zero bytes")
        pos += pad
        count = math.prod(shape)
        need = count * dtype.itemsize
        if need > MAX_TENSOR_FRAME_BYTES:
            raise MalformedFrame(f"tensor shape {list(shape)} {dtype.name} needs {need} bytes, over the frame limit")
        if n - pos != need:
            raise MalformedFrame(
                f"tensor shape {list(shape)} {dtype.name} needs {need} data bytes, frame has {n - pos}")
        array = np.frombuffer(mv, dtype=dtype, count=count, offset=pos).reshape(shape)
        array.flags.writeable = False
    except ProtocolError as e:
        e.request_id = request_id
        raise
    return TensorFrame(array, session_id, step, request_id)


def _read_id(mv: memoryview, pos: int, name: str) -> tuple[str, int]:
    if len(mv) < pos + 1:
        raise MalformedFrame(f"tensor frame ends before its {name} length")
    k = mv[pos]
    if not 1 <= k <= MAX_ID_CHARS:
        raise MalformedFrame(f"tensor {name} length {k} is outside 1..{MAX_ID_CHARS}")
    raw = bytes(mv[pos + 1:pos + 1 + k])
    if len(raw) != k:
        raise MalformedFrame(f"tensor frame ends inside its {name}")
    s = raw.decode("ascii", "replace")
    if not _is_id(s):
        raise MalformedFrame(f"tensor {name} must be {ID_RULE}; got {_show(s)}")
    return s, pos + 1 + k


def check_tensor_for(message: Message, frame: TensorFrame) -> None:
    """Raise InvalidPayload unless ``frame`` belongs to ``message`` (a type with ``tensor=True``):
    same request_id and session_id."""
    if not message.spec.tensor:
        raise InvalidPayload(f"{message.message_type} does not carry a tensor frame")
    if (frame.request_id, frame.session_id) != (message.request_id, message.session_id):
        raise InvalidPayload(
            f"tensor frame for request {frame.request_id}/session {frame.session_id} does not match "
            f"{message.message_type} {message.request_id}/session {message.session_id}")


def decode_frame(frame: Union[str, bytes, bytearray, memoryview], **kw: Any) -> Union[Message, TensorFrame]:
    """A text frame (str) as a Message, a binary frame (bytes) as a TensorFrame (websockets' recv() types).

    ``kw`` goes to decode_message. Raises what those raise.
    """
    return decode_message(frame, **kw) if isinstance(frame, str) else decode_tensor(frame)


# --------------------------------------------------------------------------- connection state

_OPENING_TYPES = frozenset({"hello", "challenge", "challenge_response", "join_hello", "join_ca", "join_request", "join_pending",
                            "join_approved", "join_rejected"})
# state -> {(sent by initiator?, message_type): next state}
_HANDSHAKE: dict[str, dict[tuple[bool, str], str]] = {
    "start": {(True, "hello"): "hello", (True, "join_hello"): "join_hello", (True, "join_request"): "joining"},
    "join_hello": {(False, "join_ca"): "join_ca"},
    "join_ca": {(True, "join_request"): "joining"},
    "hello": {(False, "challenge"): "challenged"},
    "challenged": {(True, "challenge"): "challenged_both"},
    "challenged_both": {(True, "challenge_response"): "initiator_proved"},
    "initiator_proved": {(False, "challenge_response"): "authenticated"},
    "joining": {(False, "join_pending"): "joining", (False, "join_approved"): "joined",
                (False, "join_rejected"): "rejected"},
}


class Handshake:
    """The opening of one connection, as seen by either end (no I/O).

    Members prove their keys both ways (the challenge of worker/pki.py):
    initiator ``hello`` → responder ``challenge`` (its nonce) → initiator
    ``challenge`` (its nonce) → initiator ``challenge_response`` (signature over
    the responder's nonce) → responder ``challenge_response`` (signature over the
    initiator's nonce) → "authenticated". Each side verifies the other's
    signature (``pki.verify_challenge``) before going on; this class only checks
    the order. Joiners: initiator ``join_hello`` → responder ``join_ca`` (the
    joiner checks the CA against its token before going on) → initiator
    ``join_request`` (a joiner may also start with it) → responder
    ``join_pending``* → ``join_approved`` ("joined") or ``join_rejected``
    ("rejected"); nothing follows. ``error`` is allowed in any state and changes
    nothing. Call ``sent``/``received`` for every message; any other order
    raises UnexpectedMessage.
    """

    def __init__(self, initiator: bool):
        self.initiator = initiator
        self.state = "start"

    @property
    def authenticated(self) -> bool:
        return self.state == "authenticated"

    def sent(self, message_type: str) -> None:
        self._advance(self.initiator, message_type)

    def received(self, message_type: str) -> None:
        self._advance(not self.initiator, message_type)

    def _advance(self, by_initiator: bool, message_type: str) -> None:
        if message_type == "error":
            return
        if self.state == "authenticated" and message_type not in _OPENING_TYPES:
            return
        nxt = _HANDSHAKE.get(self.state, {}).get((by_initiator, message_type))
        if nxt is None:
            who = "initiator" if by_initiator else "responder"
            raise UnexpectedMessage(f"{message_type} from the {who} is not allowed in handshake state {self.state}")
        self.state = nxt


__all__ = [
    "ADMIN", "AUTHENTICATED_ROLES", "BACKUP", "CONTROL", "CONTROL_COMMANDS", "Num", "BLOCK_RANGE", "B64", "Bool", "ClockSkew", "Conflict", "ENVELOPE_FIELDS", "ERROR_CODES",
    "ERROR_TYPES", "FRAME_LIMITS", "ID_PATTERN", "ID_RULE", "Field", "FlatObject", "FrameTooLarge", "Handshake", "Id", "Int", "IntList",
    "InternalError", "InvalidPayload", "JOINER", "JsonObject", "MAX_CLOCK_SKEW_SECONDS", "MAX_FRAME_BYTES",
    "MAX_ID_CHARS", "MAX_INPUT_IDS", "MAX_JSON_FRAME_BYTES", "MAX_TENSOR_FRAME_BYTES", "MAX_TENSOR_NDIM",
    "MAX_TOTAL_LENGTH", "MEMBER_ROLES", "MESSAGE_TYPES", "MalformedFrame", "Message", "MessageSpec", "NotAuthorized",
    "NotFound", "PROTOCOL_VERSION", "ProtocolError", "ROLES", "Record", "RecordList", "FORWARD_ROWS", "MAX_FORWARD_ROWS", "MAX_BLOCK_CHUNK", "BLOCK_STATES", "SAMPLING_FIELDS", "SESSION_FIELDS", "SUBPROTOCOL", "SUPPORTED_VERSIONS", "Str",
    "TENSOR_DTYPES", "TENSOR_MAGIC", "TensorFrame", "UnexpectedMessage", "UnknownMessageType", "UnsupportedVersion",
    "WEBSOCKET_OPTIONS", "WORKER", "authorize", "b64", "unb64", "block_range_from_wire", "block_range_to_wire", "canonical_json",
    "check_frame_size", "check_schema", "check_tensor_for", "config_signed_bytes",
    "decode_frame", "decode_message", "decode_tensor", "encode_message", "encode_tensor", "error_from_reply",
    "error_reply", "make_message", "new_request_id", "reply", "tensor_header_size", "validate_payload",
]
