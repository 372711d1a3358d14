"""The envelope codec (worker/protocol/envelope.py): the JSON text frame, its validation,
the clock-skew window, replies.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from worker.protocol import (
    PROTOCOL_VERSION,
    InvalidPayload,
    Message,
    ProtocolError,
    decode_message,
    decode_tensor,
    encode_message,
    encode_tensor,
    make_message,
    reply,
)

from tests.protocol.samples import (
    NET,
    NOW,
    SAMPLES,
    SESSION,
    code_of,
    decode,
    sample,
    wire,
)

def test_envelope_has_exactly_the_documented_fields_compactly():
    text = encode_message(sample("heartbeat"))
    assert list(json.loads(text)) == ["protocol_version", "message_type", "request_id", "network_id",
                                      "session_id", "timestamp", "payload"]
    assert json.loads(text)["protocol_version"] == PROTOCOL_VERSION == 1
    assert ": " not in text and ", " not in text


def test_integer_timestamp_decodes_as_float():
    obj = wire("leave") | {"timestamp": int(NOW)}
    m = decode(obj)
    assert m.timestamp == NOW and isinstance(m.timestamp, float)


def test_reply_echoes_request_network_and_session():
    req = sample("inference_request", request_id="chat-77")
    r = reply(req, "inference_response", SAMPLES["inference_response"][0], timestamp=NOW)
    assert (r.request_id, r.network_id, r.session_id) == ("chat-77", NET, SESSION)
    assert reply(sample("status_request"), "status_response", SAMPLES["status_response"][0]).session_id is None


def test_builders_raise_value_error_not_protocol_error():
    with pytest.raises(ValueError, match=r"payload\.version"):
        make_message("config_ack", {"version": "4"}, network_id=NET)
    with pytest.raises(ValueError, match="not defined"):
        make_message("shutdown", {}, network_id=NET)
    with pytest.raises(ValueError, match="network_id"):
        make_message("leave", {}, network_id="my network")
    bad = Message("config_ack", "r", NET, None, NOW, {"version": 0})
    with pytest.raises(ValueError) as ei:
        encode_message(bad)
    assert not isinstance(ei.value, ProtocolError)


def test_message_tensor_attribute_is_neither_encoded_nor_compared():
    m = sample("forward")
    tf = decode_tensor(encode_tensor(np.ones((5, 576), np.float32), SESSION, 0, m.request_id))
    with_tensor = dataclasses.replace(m, tensor=tf)
    assert with_tensor == m and with_tensor.tensor is tf and m.tensor is None
    assert encode_message(with_tensor) == encode_message(m)
    assert "tensor" not in json.loads(encode_message(with_tensor))
    assert decode(encode_message(with_tensor)).tensor is None


def test_a_tensor_field_in_the_envelope_is_refused():
    assert code_of(decode, wire("forward") | {"tensor": [1.0, 2.0]}) == "malformed_frame"


# --------------------------------------------------------------------------- envelope validation


ENVELOPE_CASES = [
    # (name, change to the wire dict of a heartbeat, expected code)
    ("not an object", lambda o: [o], "malformed_frame"),
    ("version missing", lambda o: o.pop("protocol_version"), "malformed_frame"),
    ("version string", lambda o: o.update(protocol_version="1"), "malformed_frame"),
    ("version bool", lambda o: o.update(protocol_version=True), "malformed_frame"),
    ("version 2", lambda o: o.update(protocol_version=2), "unsupported_version"),
    ("version 2 with new fields", lambda o: o.update(protocol_version=2, trace={}), "unsupported_version"),
    ("version 0", lambda o: o.update(protocol_version=0), "unsupported_version"),
    ("unknown field", lambda o: o.update(trace_id="x"), "malformed_frame"),
    ("type missing", lambda o: o.pop("message_type"), "malformed_frame"),
    ("type number", lambda o: o.update(message_type=3), "malformed_frame"),
    ("type unknown", lambda o: o.update(message_type="shutdown"), "unknown_message_type"),
    ("request_id missing", lambda o: o.pop("request_id"), "malformed_frame"),
    ("request_id empty", lambda o: o.update(request_id=""), "malformed_frame"),
    ("request_id 65 chars", lambda o: o.update(request_id="r" * 65), "malformed_frame"),
    ("request_id space", lambda o: o.update(request_id="req 1"), "malformed_frame"),
    ("request_id newline", lambda o: o.update(request_id="req\n1"), "malformed_frame"),
    ("request_id non-ascii", lambda o: o.update(request_id="réq"), "malformed_frame"),
    ("request_id colon", lambda o: o.update(request_id="req:1"), "malformed_frame"),
    ("request_id leading dash", lambda o: o.update(request_id="-req"), "malformed_frame"),
    ("request_id number", lambda o: o.update(request_id=7), "malformed_frame"),
    ("network_id null", lambda o: o.update(network_id=None), "malformed_frame"),
    ("session_id missing", lambda o: o.pop("session_id"), "malformed_frame"),
    ("session_id number", lambda o: o.update(session_id=5), "malformed_frame"),
    ("session_id where absent", lambda o: o.update(session_id="s1"), "invalid_payload"),
    ("timestamp string", lambda o: o.update(timestamp="1700000000"), "malformed_frame"),
    ("timestamp bool", lambda o: o.update(timestamp=True), "malformed_frame"),
    ("timestamp negative", lambda o: o.update(timestamp=-1.0), "malformed_frame"),
    ("timestamp huge int", lambda o: o.update(timestamp=10**300), "malformed_frame"),
    ("payload missing", lambda o: o.pop("payload"), "malformed_frame"),
    ("payload array", lambda o: o.update(payload=[]), "invalid_payload"),
    ("payload null", lambda o: o.update(payload=None), "invalid_payload"),
]


@pytest.mark.parametrize("name,change,code", ENVELOPE_CASES, ids=[c[0] for c in ENVELOPE_CASES])
def test_envelope_validation_rejects(name, change, code):
    obj = wire("heartbeat")
    out = change(obj)
    if isinstance(out, list):
        obj = out
    assert code_of(decode, obj) == code


@pytest.mark.parametrize("text,code", [
    ("", "malformed_frame"),
    ("{", "malformed_frame"),
    ("null", "malformed_frame"),
    ('"hello"', "malformed_frame"),
    ("[" * 100_000, "malformed_frame"),  # nesting deeper than the parser's recursion limit
    ("\ufeff{}", "malformed_frame"),
    ('{"protocol_version": NaN}', "malformed_frame"),
    ('{"protocol_version": 1, "timestamp": 1e999}', "malformed_frame"),
    ('{"protocol_version": 1, "protocol_version": 1}', "malformed_frame"),  # duplicate keys are ambiguous
    ('{"protocol_version": ' + "9" * 5000 + "}", "malformed_frame"),  # beyond int digit limits
])
def test_non_envelope_text_is_malformed(text, code):
    assert code_of(decode, text) == code


def test_text_frame_bytes_must_be_utf8():
    text = encode_message(sample("leave")).encode()
    assert code_of(decode, text.replace(b"leave", b"l\xffave")) == "malformed_frame"


def test_duplicate_payload_key_is_rejected():
    text = encode_message(sample("config_ack")).replace('"version":4', '"version":4,"version":5')
    assert code_of(decode, text) == "malformed_frame"


def test_decode_errors_carry_the_request_id_when_readable():
    obj = wire("config_ack") | {"request_id": "abc-1"}
    obj["payload"]["version"] = -1
    with pytest.raises(InvalidPayload) as ei:
        decode(obj)
    assert ei.value.request_id == "abc-1"
    obj["request_id"] = "not valid!"
    with pytest.raises(ProtocolError) as ei:
        decode(obj)
    assert ei.value.code == "malformed_frame" and ei.value.request_id is None


@pytest.mark.parametrize("offset,ok", [(0, True), (299.9, True), (-299.9, True), (300.1, False), (-300.1, False),
                                       (-86400 * 365, False)])
def test_timestamp_outside_the_skew_window_is_rejected(offset, ok):
    obj = wire("heartbeat") | {"timestamp": NOW + offset}
    if ok:
        assert decode(obj).timestamp == NOW + offset
    else:
        assert code_of(decode, obj) == "clock_skew"


def test_skew_window_is_a_parameter_so_replays_are_testable():
    old = encode_message(make_message("leave", network_id=NET, timestamp=NOW - 10))
    assert decode(old).message_type == "leave"
    assert code_of(decode, old, max_skew=5.0) == "clock_skew"
    assert decode_message(old, now=NOW + 10**6, max_skew=None).message_type == "leave"
