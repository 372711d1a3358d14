"""Protocol errors (worker/protocol/errors.py) and error replies: stable codes that travel back
to the requester as the same exception type, without leaking details.
"""
from __future__ import annotations

import re

import pytest

from worker.protocol import (
    ERROR_CODES,
    ERROR_TYPES,
    InvalidPayload,
    NotAuthorized,
    ProtocolError,
    encode_message,
    error_from_reply,
    error_reply,
)

from tests.protocol.samples import (
    NET,
    NOW,
    decode,
    wire,
)


def test_error_reply_echoes_the_request_and_keeps_code_and_message():
    e = NotAuthorized("role 'worker' may not send config_update; allowed: admin")
    r = error_reply(e, "req-9", network_id=NET, session_id="sess-1", timestamp=NOW)
    assert r.message_type == "error" and r.request_id == "req-9" and r.session_id == "sess-1"
    assert r.payload == {"code": "not_authorized", "message": e.message, "request_id": "req-9"}
    assert decode(encode_message(r)) == r


def test_error_reply_to_an_unreadable_frame_has_null_request_id():
    with pytest.raises(ProtocolError) as ei:
        decode("garbage")
    r = error_reply(ei.value, network_id=NET, timestamp=NOW)
    assert r.payload["request_id"] is None and r.payload["code"] == "malformed_frame"
    assert len(r.request_id) == 32  # a fresh id of the replier's own


def test_error_reply_takes_the_request_id_from_the_exception():
    obj = wire("heartbeat") | {"request_id": "hb-3", "message_type": "heartbeet"}
    with pytest.raises(ProtocolError) as ei:
        decode(obj)
    r = error_reply(ei.value, network_id=NET, timestamp=NOW)
    assert (r.request_id, r.payload["request_id"], r.payload["code"]) == ("hb-3", "hb-3", "unknown_message_type")


def test_other_exceptions_become_internal_without_leaking_details():
    r = error_reply(KeyError("/home/admin/.argus/ca.key"), "req-1", network_id=NET, timestamp=NOW)
    assert r.payload["code"] == "internal" and "ca.key" not in r.payload["message"]


def test_long_error_messages_are_cut_to_the_limit():
    r = error_reply(InvalidPayload("x" * 5000), "req-1", network_id=NET, timestamp=NOW)
    assert len(r.payload["message"]) == 1024
    decode(encode_message(r))


def test_every_code_has_a_type_and_round_trips_to_the_requester():
    assert set(ERROR_TYPES) == set(ERROR_CODES)
    for code, cls in ERROR_TYPES.items():
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code)
        err = error_from_reply(decode(encode_message(error_reply(cls("why"), "r-1", network_id=NET, timestamp=NOW))))
        assert type(err) is cls and err.code == code and err.message == "why" and err.request_id == "r-1"


def test_protocol_error_codes_are_closed():
    assert ProtocolError("conflict", "config version 3 is older than 4").code == "conflict"
    with pytest.raises(ValueError):
        ProtocolError("teapot", "short and stout")
