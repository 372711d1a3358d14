"""The envelope codec: ``Message`` and its JSON text frame (RFC 6455 opcode 0x1).

``make_message``/``reply``/``error_reply`` build validated messages,
``encode_message`` writes one text frame, ``decode_message`` parses and
validates one (envelope fields, version, clock skew, then the payload through
``messages.validate_payload``). ``decode_frame`` dispatches a received frame to
this codec or to ``tensor.decode_tensor``; ``check_tensor_for`` pairs a tensor
frame with the message it follows.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from worker.protocol.errors import (ERROR_CODES, ERROR_TYPES, ClockSkew, InvalidPayload, MalformedFrame, ProtocolError,
                                    UnknownMessageType, UnsupportedVersion)
from worker.protocol.limits import (ID_RULE, MAX_CLOCK_SKEW_SECONDS, MAX_JSON_FRAME_BYTES, MAX_JSON_INT, PROTOCOL_VERSION,
                                    SUPPORTED_VERSIONS, check_frame_size)
from worker.protocol.messages import MESSAGE_TYPES, MessageSpec, validate_payload
from worker.protocol.schema import is_id, is_int, is_utf8, json_type, safe_repr
from worker.protocol.tensor import TensorFrame, decode_tensor

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
    if not is_int(m.protocol_version):
        raise MalformedFrame(f"protocol_version must be an integer, got {json_type(m.protocol_version)}")
    if m.protocol_version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(
            f"protocol_version {safe_repr(m.protocol_version)} is not supported; this node speaks {sorted(SUPPORTED_VERSIONS)}")
    if not isinstance(m.message_type, str):
        raise MalformedFrame(f"message_type must be a string, got {json_type(m.message_type)}")
    spec = MESSAGE_TYPES.get(m.message_type)
    if spec is None:
        raise UnknownMessageType(f"message_type {safe_repr(m.message_type)} is not defined")
    for name in ("request_id", "network_id"):
        if not is_id(getattr(m, name)):
            raise MalformedFrame(f"{name} must be {ID_RULE}; got {safe_repr(getattr(m, name))}")
    if m.session_id is not None and not is_id(m.session_id):
        raise MalformedFrame(f"session_id must be null or {ID_RULE}; got {safe_repr(m.session_id)}")
    ts = m.timestamp
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not 0 <= ts <= MAX_JSON_INT:
        raise MalformedFrame(f"timestamp must be a non-negative number of UNIX seconds, got {safe_repr(ts)}")
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
        raise ValueError(f"cannot encode {safe_repr(m.message_type)}: {e.message}") from e
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
        raise MalformedFrame(f"frame must be a JSON object, got {json_type(obj)}")
    rid = obj.get("request_id")
    try:
        version = obj.get("protocol_version")
        if not is_int(version):
            raise MalformedFrame(f"protocol_version must be an integer, got {json_type(version)}")
        if version not in SUPPORTED_VERSIONS:  # before the fields: a newer peer's envelope may have new ones
            raise UnsupportedVersion(
                f"protocol_version {safe_repr(version)} is not supported; this node speaks {sorted(SUPPORTED_VERSIONS)}")
        unknown = sorted(k for k in obj if k not in ENVELOPE_FIELDS)
        if unknown:
            raise MalformedFrame(f"unknown envelope field(s) {', '.join(safe_repr(k, 30) for k in unknown[:5])}")
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
        e.request_id = rid if is_id(rid) else None
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
    if not is_id(request_id):
        request_id = None
    if isinstance(exc, ProtocolError) and exc.code in ERROR_CODES:
        code, message = exc.code, exc.message
    else:
        code, message = "internal", "The node failed to handle this request; its log has the details."
    if len(message) > 1024:
        message = message[:1021] + "..."
    if not is_utf8(message):
        message = message.encode("utf-8", "replace").decode("utf-8")
    return make_message(
        "error", {"code": code, "message": message, "request_id": request_id},
        network_id=network_id, request_id=request_id or new_request_id(),
        session_id=session_id if is_id(session_id) else None, timestamp=timestamp,
    )


def error_from_reply(m: Message) -> ProtocolError:
    """The typed ProtocolError an ``error`` message reports (to raise on the requesting side)."""
    p = m.payload
    return ERROR_TYPES[p["code"]](p["message"], request_id=p["request_id"])


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


__all__ = [
    "ENVELOPE_FIELDS", "Message", "check_tensor_for", "decode_frame", "decode_message", "encode_message",
    "error_from_reply", "error_reply", "make_message", "new_request_id", "reply",
]
