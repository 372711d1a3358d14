"""Protocol errors: one exception type per stable ``error`` reply code.

Decoders and checks raise these; ``envelope.error_reply`` turns one into the
``error`` message sent back, and ``envelope.error_from_reply`` turns a received
``error`` message back into the same type on the requesting side. ``ERROR_CODES``
is the closed list of codes (docs/PROTOCOL.md lists them too).
"""
from __future__ import annotations

from typing import ClassVar, Optional

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


__all__ = [
    "ClockSkew", "Conflict", "ERROR_CODES", "ERROR_TYPES", "FrameTooLarge", "InternalError", "InvalidPayload",
    "MalformedFrame", "NotAuthorized", "NotFound", "ProtocolError", "UnexpectedMessage", "UnknownMessageType",
    "UnsupportedVersion",
]
