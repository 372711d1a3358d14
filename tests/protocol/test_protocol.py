"""The worker protocol (worker/protocol.py): messages, roles, errors, tensor frames, limits, fuzzing.

Pure tests (no network) except one loopback check that websockets accepts WEBSOCKET_OPTIONS.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import random
import re
import signal
import struct
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.engine.block_range import BlockRange
from worker.protocol import (
    BLOCK_STATES,
    CONTROL_COMMANDS,
    ERROR_CODES,
    ERROR_TYPES,
    MAX_BLOCK_CHUNK,
    MAX_FORWARD_ROWS,
    MAX_FRAME_BYTES,
    MAX_ID_CHARS,
    MAX_INPUT_IDS,
    MAX_JSON_FRAME_BYTES,
    MAX_TENSOR_FRAME_BYTES,
    MAX_TOTAL_LENGTH,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    TENSOR_DTYPES,
    WEBSOCKET_OPTIONS,
    Handshake,
    InvalidPayload,
    Message,
    NotAuthorized,
    ProtocolError,
    TensorFrame,
    UnexpectedMessage,
    UnknownMessageType,
    authorize,
    block_range_from_wire,
    block_range_to_wire,
    canonical_json,
    check_frame_size,
    check_tensor_for,
    config_signed_bytes,
    decode_frame,
    decode_message,
    decode_tensor,
    encode_message,
    encode_tensor,
    error_from_reply,
    error_reply,
    make_message,
    reply,
)

from tests.support.paths import REPO
NOW = 1_700_000_000.0
NET = "net-1"
B64_32 = base64.b64encode(bytes(range(32))).decode()
B64_64 = base64.b64encode(bytes(range(64))).decode()
CERT = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"
CSR = "-----BEGIN CERTIFICATE REQUEST-----\nMIIBDzCBtwIBADAV\n-----END CERTIFICATE REQUEST-----\n"
RANGE = {"model_id": "smollm2-135M-32c0b8179c87", "start": 0, "end": 15, "total": 30}
SESSION = "net-1.conv-42"  # <network_id>.<conversation key>, docs/PROTOCOL.md
SHA_MODEL, SHA_SHARD, SHA_CHUNK = "5f" * 32, "a3" * 32, "0c" * 32  # hex SHA-256 digests
PROMPT = [1, 9690, 198, 2683]
ROWS = [  # a prefill row and a decode row of another conversation, batched
    {"session_id": SESSION, "start_pos": 0, "n_tokens": 4, "token_ids": PROMPT},
    {"session_id": "net-1.conv-7", "start_pos": 37, "n_tokens": 1, "token_ids": [314]},
]
ROW0, ROW1 = ROWS
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 1234, "repetition_penalty": 1.1, "ignore_eos": False}
USAGE = {"prompt_tokens": 4, "cached_tokens": 0, "completion_tokens": 12, "prefill_ms": 41.5, "decode_tokens_s": 38.2}
SESSION_ROW = {"session_id": SESSION, "n_tokens": 41, "bytes": 2957312, "saved_at": 1699999990.5, "in_memory": True,
               "block_range": "0-15"}
RESOURCES = {"cpu_count": 8, "memory_bytes": 17179869184, "gflops": 41.5, "os": "linux"}
CONFIG = {"model_id": "tinyllama-1.1b-chat-q8_0", "placement": {"node-a": [0, 11], "node-b": [11, 22]}}

# One valid (payload, session_id) per message type: the specification by example.
SAMPLES: dict[str, tuple[dict, str | None]] = {
    "hello": ({"node_id": "node-a", "role": "worker", "version": "0.4.0", "resources": RESOURCES}, None),
    "challenge": ({"nonce": B64_32}, None),
    "challenge_response": ({"signature": B64_64}, None),
    "join_hello": ({}, None),
    "join_ca": ({"ca_pem": CERT, "admin_node_id": "node-a"}, None),
    "join_request": ({"token": "join-3f9c2a7e", "csr_pem": CSR, "node_id": "node-c", "address": "10.0.0.7:7801",
                      "resources": RESOURCES}, None),
    "join_pending": ({}, None),
    "join_approved": ({"certificate_pem": CERT, "ca_pem": CERT, "config": CONFIG}, None),
    "join_rejected": ({"reason": "The join token has expired; ask the admin for a new one."}, None),
    "heartbeat": ({"resources": RESOURCES, "config_version": 3}, None),
    "config_update": ({"config": CONFIG, "version": 4, "signature": B64_64}, None),
    "config_ack": ({"version": 4}, None),
    "member_remove": ({"node_id": "node-b"}, None),
    "status_request": ({}, None),
    "status_response": ({"node_id": "node-a", "role": "worker", "version": "0.4.0", "config_version": 4,
                         "resources": RESOURCES, "block_range": RANGE, "sessions": 2}, None),
    "leave": ({}, None),
    "inference_request": ({"input_ids": PROMPT, "attention_mask": [1, 1, 1, 1], "max_length": 512,
                           "sampling": SAMPLING}, SESSION),
    "inference_response": ({"token_id": 7042, "text": " Paris", "done": False, "finish_reason": None,
                            "usage": None}, SESSION),
    "inference_cancel": ({}, SESSION),
    "forward": ({"block_range": RANGE, "rows": ROWS}, SESSION),
    "forward_result": ({"block_range": RANGE, "rows": ROWS}, SESSION),
    "session_query": ({"token_ids": PROMPT}, SESSION),
    "session_save": ({}, SESSION),
    "session_drop": ({}, SESSION),
    "session_info": ({"cached_tokens": 4, "n_tokens": 41, "saved": True}, SESSION),
    "sessions_request": ({}, None),
    "sessions_response": ({"sessions": [SESSION_ROW]}, None),
    "blocks_offer": ({"epoch": 3, "model_sha256": SHA_MODEL, "block_range": RANGE, "shard_sha256": SHA_SHARD,
                      "shard_bytes": 52428800, "chunk_bytes": 4194304}, None),
    "blocks_chunk": ({"shard_sha256": SHA_SHARD, "offset": 4194304, "sha256": SHA_CHUNK}, "blocks-3"),
    "blocks_status": ({"shard_sha256": SHA_SHARD, "have_bytes": 8388608, "state": "receiving", "message": ""},
                      "blocks-3"),
    "control": ({"command": "worker_allocate", "args": {"network_id": "net-1", "node_id": "node-b",
                 "cpu_share": 0.5, "ram_bytes": 2147483648, "disk_bytes": None}}, None),
    "control_result": ({"result": {"node_id": "node-b", "config_version": 5}}, None),
    "error": ({"code": "not_found", "message": "Session sess-9 is not held by this worker.",
               "request_id": "req-7"}, "sess-9"),
}

# Who may send what, as the issue states it (the module's table must agree).
SENDERS = {
    "hello": {"admin", "worker", "backup", "control"},
    "challenge": {"admin", "worker", "backup", "control"},
    "challenge_response": {"admin", "worker", "backup", "control"},
    "join_hello": {"joiner"},
    "join_ca": {"admin"},
    "join_request": {"joiner"},
    "join_pending": {"admin"}, "join_approved": {"admin"}, "join_rejected": {"admin"},
    "heartbeat": {"admin", "worker", "backup"},
    "config_update": {"admin"},
    "config_ack": {"worker", "backup"},
    "member_remove": {"admin"},
    "status_request": {"admin"},
    "status_response": {"admin", "worker", "backup"},
    "leave": {"worker", "backup"},
    "inference_request": {"admin", "control"},
    "inference_response": {"admin", "worker"},
    "inference_cancel": {"admin", "control"},
    "forward": {"admin"},
    "forward_result": {"worker"},
    "session_query": {"admin"}, "session_save": {"admin"}, "session_drop": {"admin"},
    "session_info": {"worker"},
    "sessions_request": {"admin"},
    "sessions_response": {"worker"},
    "blocks_offer": {"admin"}, "blocks_chunk": {"admin"},
    "blocks_status": {"worker"},
    "control": {"control"},
    "control_result": {"admin"},
    "error": {"admin", "worker", "backup", "joiner", "control"},
}
ROLES = ("admin", "worker", "backup", "joiner", "control")


def sample(message_type: str, request_id: str = "req-1") -> Message:
    payload, session = SAMPLES[message_type]
    return make_message(message_type, json.loads(json.dumps(payload)), network_id=NET, request_id=request_id,
                        session_id=session, timestamp=NOW)


def wire(message_type: str) -> dict:
    return json.loads(encode_message(sample(message_type)))


def decode(obj_or_text, **kw) -> Message:
    text = obj_or_text if isinstance(obj_or_text, (str, bytes)) else json.dumps(obj_or_text)
    return decode_message(text, now=NOW, **kw)


def code_of(fn, *args, **kw) -> str:
    with pytest.raises(ProtocolError) as ei:
        fn(*args, **kw)
    return ei.value.code


# --------------------------------------------------------------------------- messages


def test_samples_cover_every_message_type():
    assert set(SAMPLES) == set(MESSAGE_TYPES) == set(SENDERS)


@pytest.mark.parametrize("message_type", sorted(MESSAGE_TYPES))
def test_every_message_type_round_trips_through_json_text(message_type):
    m = sample(message_type)
    text = encode_message(m)
    assert json.loads(text)["message_type"] == message_type
    assert decode(text) == m
    assert decode(text.encode("utf-8")) == m


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


def test_block_range_travels_as_the_engine_value():
    r = BlockRange("smollm2-135M-32c0b8179c87", 15, 30, 30)
    m = make_message("forward", {"block_range": block_range_to_wire(r), "rows": ROWS}, network_id=NET,
                     session_id="s", timestamp=NOW)
    assert block_range_from_wire(decode(encode_message(m)).payload["block_range"]) == r
    assert r.is_last and not r.is_first


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


def test_forward_batches_at_most_max_forward_rows_sessions():
    rows = [{"session_id": f"net-1.c{i}", "start_pos": i, "n_tokens": 1, "token_ids": [i]} for i in range(64)]
    assert MAX_FORWARD_ROWS == 64
    m = make_message("forward", {"block_range": RANGE, "rows": rows}, network_id=NET, session_id="batch-1")
    assert [r["session_id"] for r in decode(encode_message(m), max_skew=None).payload["rows"]] == [
        f"net-1.c{i}" for i in range(64)]
    with pytest.raises(ValueError, match=r"payload\.rows must have 1\.\.64 items, got 65"):
        make_message("forward", {"block_range": RANGE, "rows": rows + [rows[0] | {"session_id": "x"}]},
                     network_id=NET, session_id="batch-1")


def test_a_full_length_prefill_forward_fits_one_text_frame():
    """8192 token ids of the largest value still encode under the 1 MiB text-frame limit."""
    ids = [2**31 - 1] * MAX_INPUT_IDS
    row = {"session_id": SESSION, "start_pos": MAX_TOTAL_LENGTH - MAX_INPUT_IDS, "n_tokens": MAX_INPUT_IDS,
           "token_ids": ids}
    text = encode_message(make_message("forward", {"block_range": RANGE, "rows": [row]}, network_id=NET,
                                       session_id=SESSION))
    assert len(text.encode()) < MAX_JSON_FRAME_BYTES


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


# Whether the envelope's session_id is required, optional or must be null, per type (docs/PROTOCOL.md).
SESSION_BOUND = {"inference_request", "inference_response", "inference_cancel", "forward", "forward_result",
                 "session_query", "session_save", "session_drop", "session_info", "blocks_chunk"}
SESSION_OPTIONAL = {"error", "blocks_status"}
TENSOR_CARRYING = {"forward", "forward_result", "blocks_chunk"}


def test_module_session_and_tensor_rules_are_the_documented_ones():
    rules = {t: s.session for t, s in MESSAGE_TYPES.items()}
    assert {t for t, r in rules.items() if r == "required"} == SESSION_BOUND
    assert {t for t, r in rules.items() if r == "optional"} == SESSION_OPTIONAL
    assert {t for t, s in MESSAGE_TYPES.items() if s.tensor} == TENSOR_CARRYING


@pytest.mark.parametrize("message_type", sorted(SESSION_BOUND))
def test_session_bound_messages_need_a_session_id(message_type):
    obj = wire(message_type) | {"session_id": None}
    assert code_of(decode, obj) == "invalid_payload"


@pytest.mark.parametrize("message_type", sorted(set(MESSAGE_TYPES) - SESSION_BOUND - SESSION_OPTIONAL))
def test_other_messages_must_not_carry_a_session_id(message_type):
    obj = wire(message_type) | {"session_id": SESSION}
    with pytest.raises(InvalidPayload, match="must not carry a session_id"):
        decode(obj)


@pytest.mark.parametrize("session_id", [None, "blocks-3"])
def test_blocks_status_may_echo_the_chunks_session_or_not(session_id):
    assert decode(wire("blocks_status") | {"session_id": session_id}).session_id == session_id


# --------------------------------------------------------------------------- payload validation


def wrong_type_value(value):
    """A JSON value of another type than ``value``."""
    if isinstance(value, str):
        return 17
    if isinstance(value, (dict, list)):
        return "text"
    return ["a list"]


FIELD_CASES = [(t, k) for t in sorted(SAMPLES) for k in SAMPLES[t][0]]


@pytest.mark.parametrize("message_type,key", FIELD_CASES, ids=[f"{t}.{k}" for t, k in FIELD_CASES])
def test_every_payload_field_is_required_and_typed(message_type, key):
    obj = wire(message_type)
    del obj["payload"][key]
    with pytest.raises(InvalidPayload, match=rf"payload\.{key} is missing"):
        decode(obj)
    obj = wire(message_type)
    obj["payload"][key] = wrong_type_value(obj["payload"][key])
    with pytest.raises(InvalidPayload, match=rf"payload\.{key}"):
        decode(obj)


@pytest.mark.parametrize("message_type", sorted(SAMPLES))
def test_unknown_payload_fields_are_rejected(message_type):
    obj = wire(message_type)
    obj["payload"]["extra"] = 1
    with pytest.raises(InvalidPayload, match="unknown field"):
        decode(obj)


PAYLOAD_CASES = [
    # (message type, payload changes, fragment of the error message)
    ("hello", {"node_id": "n" * (MAX_ID_CHARS + 1)}, "payload.node_id"),
    ("hello", {"role": "joiner"}, "payload.role must be one of"),
    ("hello", {"role": "root"}, "payload.role must be one of"),
    ("hello", {"version": ""}, "payload.version must have 1..64"),
    ("hello", {"resources": {"gpus": [0, 1]}}, "payload.resources.gpus"),
    ("hello", {"resources": {f"k{i}": i for i in range(65)}}, "65 keys"),
    ("hello", {"resources": {"os": "x" * 257}}, "payload.resources.os"),
    ("hello", {"resources": {"ram": 2**60}}, "payload.resources.ram"),
    ("challenge", {"nonce": "not base64!"}, "not valid base64"),
    ("challenge", {"nonce": base64.b64encode(b"short").decode()}, "must decode to 32 bytes, got 5"),
    ("challenge", {"nonce": base64.b64encode(bytes(33)).decode()}, "must decode to 32 bytes, got 33"),
    ("challenge", {"nonce": B64_32.rstrip("=")}, "not valid base64"),  # padding required
    ("challenge_response", {"signature": ""}, "payload.signature"),
    ("challenge_response", {"signature": base64.b64encode(bytes(257)).decode()}, "payload.signature"),
    ("challenge_response", {"signature": "é" * 8}, "not valid base64"),
    ("join_request", {"token": "t" * 2049}, "payload.token must have 1..2048"),
    ("join_request", {"csr_pem": CERT}, "must start with '-----BEGIN CERTIFICATE REQUEST-----'"),
    ("join_request", {"csr_pem": CSR + "x" * 16384}, "payload.csr_pem must have"),
    ("join_approved", {"certificate_pem": "MIIB"}, "payload.certificate_pem must start"),
    ("join_approved", {"config": {"a": [[[[[[[[[[[[[[[[{"x": 1}]]]]]]]]]]]]]]]]}}, "nested deeper than 16"),
    ("join_rejected", {"reason": "r" * 1025}, "payload.reason must have 1..1024"),
    ("heartbeat", {"config_version": -1}, "payload.config_version must be in 0.."),
    ("heartbeat", {"config_version": 2.0}, "payload.config_version must be an integer"),
    ("heartbeat", {"config_version": True}, "payload.config_version must be an integer"),
    ("heartbeat", {"config_version": 2**53}, "payload.config_version must be in"),
    ("config_update", {"version": 0}, "payload.version must be in 1.."),
    ("config_update", {"config": []}, "payload.config must be an object"),
    ("config_ack", {"version": None}, "payload.version must not be null"),
    ("member_remove", {"node_id": "node b"}, "payload.node_id must be 1..64 characters"),
    ("status_response", {"block_range": None}, None),  # null allowed: holds no blocks
    ("status_response", {"block_range": RANGE | {"start": 15}}, "payload.block_range [15, 15) is empty"),
    ("status_response", {"sessions": -1}, "payload.sessions"),
    ("inference_request", {"input_ids": []}, "payload.input_ids must have 1..8192 items, got 0"),
    ("inference_request", {"input_ids": [1] * (MAX_INPUT_IDS + 1), "attention_mask": None, "max_length": 16384},
     "payload.input_ids must have 1..8192 items, got 8193"),
    ("inference_request", {"input_ids": [1] * MAX_INPUT_IDS, "attention_mask": None, "max_length": 16384}, None),
    ("inference_request", {"input_ids": [1, -2, 3, 4]}, r"payload.input_ids[1] must be an integer in 0..2147483647"),
    ("inference_request", {"input_ids": [1, 2**31, 3, 4]}, "payload.input_ids[1]"),
    ("inference_request", {"input_ids": [1, 2.0, 3, 4]}, "payload.input_ids[1]"),
    ("inference_request", {"input_ids": [1, True, 3, 4]}, "payload.input_ids[1]"),
    ("inference_request", {"attention_mask": [1, 1, 1]}, "attention_mask has 3 items; input_ids has 4"),
    ("inference_request", {"attention_mask": [1, 2, 1, 1]}, "payload.attention_mask[1]"),
    ("inference_request", {"attention_mask": None}, None),
    ("inference_request", {"max_length": 4}, "max_length (4) must exceed the 4 input ids"),
    ("inference_request", {"max_length": 16385}, "payload.max_length must be in 2..16384"),
    ("inference_response", {"done": True}, "finish_reason must be set exactly when done"),
    ("inference_response", {"finish_reason": "stop"}, "finish_reason must be set exactly when done"),
    ("inference_response", {"done": True, "finish_reason": "stop", "token_id": None, "text": ""}, None),
    ("inference_response", {"done": True, "finish_reason": "timeout"}, "payload.finish_reason must be one of"),
    ("inference_response", {"text": "\ud800"}, "lone surrogate"),
    ("inference_request", {"sampling": None}, None),  # null: the daemon's defaults (greedy)
    ("inference_request", {"sampling": SAMPLING | {"temperature": 0.0, "top_k": 0, "seed": None}}, None),
    ("inference_request", {"sampling": SAMPLING | {"temperature": 5.01}}, "payload.sampling.temperature must be in 0..5"),
    ("inference_request", {"sampling": SAMPLING | {"temperature": -0.1}}, "payload.sampling.temperature must be in 0..5"),
    ("inference_request", {"sampling": SAMPLING | {"temperature": True}}, "payload.sampling.temperature must be a number"),
    ("inference_request", {"sampling": SAMPLING | {"top_p": 1.5}}, "payload.sampling.top_p must be in 0..1"),
    ("inference_request", {"sampling": SAMPLING | {"top_k": -1}}, "payload.sampling.top_k must be in 0..2147483647"),
    ("inference_request", {"sampling": SAMPLING | {"top_k": 4.5}}, "payload.sampling.top_k must be an integer"),
    ("inference_request", {"sampling": SAMPLING | {"seed": -5}}, "payload.sampling.seed must be in 0.."),
    ("inference_request", {"sampling": SAMPLING | {"repetition_penalty": 0.0}},
     "payload.sampling.repetition_penalty must be in 0.01..10"),
    ("inference_request", {"sampling": SAMPLING | {"repetition_penalty": 10.5}},
     "payload.sampling.repetition_penalty must be in 0.01..10"),
    ("inference_request", {"sampling": SAMPLING | {"ignore_eos": "no"}}, "payload.sampling.ignore_eos must be true or false"),
    ("inference_request", {"sampling": dict.fromkeys(SAMPLING)}, None),  # every knob at the daemon's default
    ("inference_request", {"sampling": {k: v for k, v in SAMPLING.items() if k != "seed"}},
     "payload.sampling.seed is missing"),
    ("inference_request", {"sampling": SAMPLING | {"min_p": 0.1}}, "payload.sampling has unknown field(s) 'min_p'"),
    ("inference_request", {"sampling": [0.7]}, "payload.sampling must be an object"),
    ("inference_response", {"done": True, "finish_reason": "stop", "usage": USAGE}, None),
    ("inference_response", {"done": True, "finish_reason": "cancelled", "token_id": None, "text": "", "usage": None},
     None),
    ("inference_response", {"usage": {"per_token_ms": [3.1, 2.9]}}, "payload.usage.per_token_ms"),
    ("inference_response", {"usage": {f"k{i}": i for i in range(65)}}, "payload.usage has 65 keys"),
    ("forward", {"block_range": RANGE | {"end": 31}}, "outside the model's 30 blocks"),
    ("forward", {"block_range": RANGE | {"start": 15}}, "payload.block_range [15, 15) is empty"),
    ("forward", {"block_range": RANGE | {"end": "11"}}, "payload.block_range.end must be an integer"),
    ("forward", {"block_range": RANGE | {"layers": 3}}, "payload.block_range has unknown field"),
    ("forward", {"block_range": {"start": 0, "end": 1, "total": 2}}, "payload.block_range.model_id is missing"),
    ("forward", {"start_pos": 0}, "payload has unknown field(s) 'start_pos'"),  # the version-1 draft's field
    ("forward", {"rows": [ROW0 | {"n_tokens": 3}]}, "payload.rows[0].token_ids has 4 ids; n_tokens is 3"),
    ("forward", {"rows": [ROW0, ROW1 | {"n_tokens": 2}]}, "payload.rows[1].token_ids has 1 ids; n_tokens is 2"),
    ("forward", {"rows": [ROW0, ROW1, ROW0]}, "payload.rows[2]: session net-1.conv-42 appears twice in one forward"),
    ("forward", {"rows": []}, "payload.rows must have 1..64 items, got 0"),
    ("forward", {"rows": {"0": ROW0}}, "payload.rows must be an array of objects, got object"),
    ("forward", {"rows": [ROW0, 5]}, "payload.rows[1] must be an object, got number"),
    ("forward", {"rows": [ROW0 | {"cached": True}]}, "payload.rows[0] has unknown field(s) 'cached'"),
    ("forward", {"rows": [{k: v for k, v in ROW0.items() if k != "start_pos"}]}, "payload.rows[0].start_pos is missing"),
    ("forward", {"rows": [ROW0 | {"session_id": "net 1"}]}, "payload.rows[0].session_id must be 1..64 characters"),
    ("forward", {"rows": [ROW0 | {"session_id": None}]}, "payload.rows[0].session_id must not be null"),
    ("forward", {"rows": [ROW0 | {"start_pos": -1}]}, "payload.rows[0].start_pos must be in 0..16384"),
    ("forward", {"rows": [ROW0 | {"start_pos": MAX_TOTAL_LENGTH + 1}]}, "payload.rows[0].start_pos must be in 0..16384"),
    ("forward", {"rows": [ROW0 | {"start_pos": MAX_TOTAL_LENGTH}]}, None),
    ("forward", {"rows": [ROW0 | {"n_tokens": 0, "token_ids": []}]}, "payload.rows[0].n_tokens must be in 1..8192"),
    ("forward", {"rows": [ROW0 | {"n_tokens": 8193, "token_ids": [1] * 8193}]}, "payload.rows[0].n_tokens must be in 1..8192"),
    ("forward", {"rows": [ROW0 | {"token_ids": [1, -2, 3, 4]}]}, "payload.rows[0].token_ids[1] must be an integer in 0..2147483647"),
    ("forward", {"rows": [ROW0 | {"token_ids": [1, 2, 3.0, 4]}]}, "payload.rows[0].token_ids[2] must be an integer"),
    ("forward_result", {"rows": [ROW1, ROW1]}, "payload.rows[1]: session net-1.conv-7 appears twice in one forward"),
    ("forward_result", {"rows": [ROW1 | {"token_ids": []}]}, "payload.rows[0].token_ids must have 1..8192 items, got 0"),
    ("forward_result", {"block_range": RANGE | {"start": 30, "end": 31}}, "outside the model's 30 blocks"),
    ("session_query", {"token_ids": []}, None),  # what is cached, whatever the prefix
    ("session_query", {"token_ids": [1] * MAX_TOTAL_LENGTH}, None),
    ("session_query", {"token_ids": [1] * (MAX_TOTAL_LENGTH + 1)}, "payload.token_ids must have 0..16384 items, got 16385"),
    ("session_query", {"token_ids": [2**31]}, "payload.token_ids[0] must be an integer in 0..2147483647"),
    ("session_info", {"cached_tokens": -1}, "payload.cached_tokens must be in 0..16384"),
    ("session_info", {"n_tokens": MAX_TOTAL_LENGTH + 1}, "payload.n_tokens must be in 0..16384"),
    ("session_info", {"saved": "yes"}, "payload.saved must be true or false"),
    ("session_info", {"cached_tokens": 0, "n_tokens": 0, "saved": False}, None),
    ("sessions_response", {"sessions": []}, None),
    ("sessions_response", {"sessions": [SESSION_ROW] * 1001}, "payload.sessions must have 0..1000 items, got 1001"),
    ("sessions_response", {"sessions": [SESSION_ROW | {"saved_at": None, "in_memory": False}]}, None),
    ("sessions_response", {"sessions": [SESSION_ROW | {"saved_at": -1.0}]}, "payload.sessions[0].saved_at must be in 0"),
    ("sessions_response", {"sessions": [SESSION_ROW | {"bytes": -1}]}, "payload.sessions[0].bytes must be in 0.."),
    ("sessions_response", {"sessions": [SESSION_ROW | {"block_range": "x" * 65}]},
     "payload.sessions[0].block_range must have 0..64 characters"),
    ("sessions_response", {"sessions": [SESSION_ROW | {"session_id": ""}]}, "payload.sessions[0].session_id must have 1..128"),
    ("sessions_response", {"sessions": [{k: v for k, v in SESSION_ROW.items() if k != "in_memory"}]},
     "payload.sessions[0].in_memory is missing"),
    ("sessions_response", {"sessions": [SESSION_ROW, "net-1.conv-7"]}, "payload.sessions[1] must be an object"),
    ("blocks_offer", {"chunk_bytes": MAX_BLOCK_CHUNK}, None),
    ("blocks_offer", {"chunk_bytes": MAX_BLOCK_CHUNK + 1}, "payload.chunk_bytes must be in 1..8388608, got 8388609"),
    ("blocks_offer", {"chunk_bytes": 0}, "payload.chunk_bytes must be in 1..8388608"),
    ("blocks_offer", {"shard_bytes": 0}, "payload.shard_bytes must be in 1.."),
    ("blocks_offer", {"epoch": -1}, "payload.epoch must be in 0.."),
    ("blocks_offer", {"model_sha256": "5f" * 31}, "payload.model_sha256 must have 64..64 characters, got 62"),
    ("blocks_offer", {"shard_sha256": "a3" * 33}, "payload.shard_sha256 must have 64..64 characters, got 66"),
    ("blocks_offer", {"block_range": RANGE | {"start": 20, "end": 10}}, "payload.block_range [20, 10) is empty"),
    ("blocks_offer", {"block_range": None}, "payload.block_range must not be null"),
    ("blocks_chunk", {"offset": -1}, "payload.offset must be in 0.."),
    ("blocks_chunk", {"sha256": ""}, "payload.sha256 must have 64..64 characters, got 0"),
    ("blocks_status", {"state": "done"}, "payload.state must be one of need, receiving, verified, loaded, failed"),
    ("blocks_status", {"state": "FAILED"}, "payload.state must be one of"),
    ("blocks_status", {"have_bytes": -1}, "payload.have_bytes must be in 0.."),
    ("blocks_status", {"message": "m" * 1025}, "payload.message must have 0..1024 characters"),
    ("blocks_status", {"state": "failed", "message": "The shard's SHA-256 does not match; it was discarded."}, None),
    ("error", {"code": "oops"}, "payload.code must be one of"),
    ("error", {"request_id": None}, None),
    ("error", {"message": ""}, "payload.message must have 1..1024"),
]


@pytest.mark.parametrize("message_type,changes,fragment", PAYLOAD_CASES,
                         ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(PAYLOAD_CASES)])
def test_payload_limits(message_type, changes, fragment):
    obj = wire(message_type)
    obj["payload"].update(changes)
    text = json.dumps(obj)
    if fragment is None:
        assert decode(text).payload == obj["payload"]
    else:
        with pytest.raises(InvalidPayload, match=re.escape(fragment)):
            decode(text)


# --------------------------------------------------------------------------- roles


@pytest.mark.parametrize("message_type", sorted(SENDERS))
@pytest.mark.parametrize("role", ROLES)
def test_role_table(message_type, role):
    if role in SENDERS[message_type]:
        authorize(message_type, role)
    else:
        with pytest.raises(NotAuthorized, match=f"may not send {message_type}"):
            authorize(message_type, role)


def test_module_role_table_is_the_issues():
    assert {t: set(s.senders) for t, s in MESSAGE_TYPES.items()} == SENDERS


def test_stage_session_and_block_messages_flow_admin_to_worker_and_back():
    """The admin drives the chain: it alone sends work and blocks; only workers answer them."""
    requests = ("forward", "session_query", "session_save", "session_drop", "sessions_request", "blocks_offer",
                "blocks_chunk")
    answers = ("forward_result", "session_info", "sessions_response", "blocks_status")
    for t in requests:
        authorize(t, "admin")
        for role in ("worker", "backup", "joiner", "control"):
            with pytest.raises(NotAuthorized):
                authorize(t, role)
    for t in answers:
        authorize(t, "worker")
        for role in ("admin", "backup", "joiner", "control"):
            with pytest.raises(NotAuthorized):
                authorize(t, role)


def test_unknown_role_or_type_is_refused():
    with pytest.raises(NotAuthorized):
        authorize("heartbeat", "root")
    with pytest.raises(UnknownMessageType):
        authorize("shutdown", "admin")


# --------------------------------------------------------------------------- control commands of issue 6

# One valid ``args`` per new command, as the chat server sends them (every key, null where not given).
CONTROL_SAMPLES = {
    "placement_plan": {"network_id": NET},
    "placement_apply": {"network_id": NET},
    "distribution_status": {"network_id": NET},
    "sessions_list": {"network_id": NET},
    "session_drop": {"network_id": NET, "session_id": SESSION},
}


def control(command: str, args: dict) -> Message:
    return make_message("control", {"command": command, "args": args}, network_id="control", timestamp=NOW)


@pytest.mark.parametrize("command", sorted(CONTROL_SAMPLES))
def test_issue6_control_commands_round_trip(command):
    m = control(command, CONTROL_SAMPLES[command])
    assert decode(encode_message(m)).payload == {"command": command, "args": CONTROL_SAMPLES[command]}
    assert set(CONTROL_COMMANDS[command]) == set(CONTROL_SAMPLES[command])


@pytest.mark.parametrize("command,args,fragment", [
    ("placement_plan", {}, "args.network_id is missing"),
    ("placement_apply", {"network_id": NET, "epoch": 4}, "args has unknown field(s) 'epoch'"),
    ("distribution_status", {"network_id": None}, "args.network_id must not be null"),
    ("sessions_list", {"network_id": "net 1"}, "args.network_id must be 1..64 characters"),
    ("session_drop", {"network_id": NET}, "args.session_id is missing"),
    ("session_drop", {"network_id": NET, "session_id": "net-1/conv"}, "args.session_id must be 1..64 characters"),
    ("session_drop", {"network_id": NET, "session_id": "n" * 65}, "args.session_id must be 1..64 characters"),
    ("placement_rebalance", {"network_id": NET}, "control command 'placement_rebalance' is not defined"),
])
def test_issue6_control_commands_refuse_bad_args(command, args, fragment):
    obj = json.loads(encode_message(control("placement_plan", {"network_id": NET})))
    obj["payload"] = {"command": command, "args": args}
    with pytest.raises(InvalidPayload, match=re.escape(fragment)):
        decode(obj)


def test_block_states_are_the_documented_ones_in_transfer_order():
    assert BLOCK_STATES == ("need", "receiving", "verified", "loaded", "failed")


# --------------------------------------------------------------------------- errors


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


# --------------------------------------------------------------------------- tensor frames

DTYPES = [np.float32, np.float16, np.int32, np.int64, np.uint8]
SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (1, 2, 3, 2), (0,), (4, 0), (2, 0, 3), (0, 1, 1, 0)]


def some_array(dtype, shape) -> np.ndarray:
    rng = np.random.default_rng(abs(hash((np.dtype(dtype).str, shape))) % 2**32)
    a = rng.standard_normal(shape) * 100
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=shape, endpoint=True)
    return np.asarray(a).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensor_round_trip_is_byte_exact(dtype, shape):
    a = some_array(dtype, shape)
    frame = encode_tensor(a, "sess-42", 2**64 - 1, "req-1")
    t = decode_tensor(frame)
    assert isinstance(t, TensorFrame)
    assert (t.session_id, t.step, t.request_id) == ("sess-42", 2**64 - 1, "req-1")
    assert t.array.dtype == np.dtype(dtype).newbyteorder("<") and t.array.shape == shape
    assert t.array.tobytes() == a.tobytes()  # bit-exact, NaN payloads and -0.0 included
    assert encode_tensor(t.array, t.session_id, t.step, t.request_id) == frame


def test_decoded_array_is_a_read_only_view_of_the_frame():
    frame = encode_tensor(np.arange(12, dtype=np.float32).reshape(3, 4), "s", 0, "r")
    t = decode_tensor(frame)
    assert np.shares_memory(t.array, np.frombuffer(frame, np.uint8))
    assert not t.array.flags.writeable
    with pytest.raises(ValueError):
        t.array[0, 0] = 1.0
    buf = bytearray(frame)  # a writable buffer still gives a read-only view
    t2 = decode_tensor(buf)
    assert not t2.array.flags.writeable and np.shares_memory(t2.array, np.frombuffer(buf, np.uint8))
    assert decode_tensor(memoryview(frame)).array.tolist() == t.array.tolist()


@pytest.mark.parametrize("sid,rid", [("s", "r"), ("s" * 64, "r" * 64), ("ab", "cde"), ("sess-42", "r")])
def test_tensor_data_starts_aligned_to_8_bytes(sid, rid):
    a = np.arange(3, dtype=np.int64)
    frame = encode_tensor(a, sid, 1, rid)
    assert (len(frame) - a.nbytes) % 8 == 0
    assert frame[-a.nbytes:] == a.tobytes()


def test_big_endian_and_strided_arrays_are_sent_little_endian_c_order():
    a = np.arange(12, dtype=">f4").reshape(3, 4).T  # big-endian, Fortran-ordered view
    t = decode_tensor(encode_tensor(a, "s", 0, "r"))
    assert t.array.dtype.str == "<f4" and np.array_equal(t.array, a)
    assert encode_tensor(a, "s", 0, "r") == encode_tensor(np.ascontiguousarray(a, "<f4"), "s", 0, "r")


@pytest.mark.parametrize("array,err", [
    (np.zeros(2, np.float64), TypeError),
    (np.zeros(2, np.bool_), TypeError),
    (np.zeros(2, np.int16), TypeError),
    (np.zeros((1, 1, 1, 1, 1), np.float32), ValueError),
])
def test_encode_refuses_unsupported_arrays(array, err):
    with pytest.raises(err):
        encode_tensor(array, "s", 0, "r")


@pytest.mark.parametrize("sid,step,rid", [("", 0, "r"), ("s" * 65, 0, "r"), ("s", -1, "r"), ("s", 2**64, "r"),
                                          ("s", 0, "é"), ("s", 0, "a b"), ("s", True, "r")])
def test_encode_refuses_bad_ids_and_steps(sid, step, rid):
    with pytest.raises(ValueError):
        encode_tensor(np.zeros(1, np.float32), sid, step, rid)


def test_encode_refuses_frames_over_the_limit():
    big = np.zeros(MAX_TENSOR_FRAME_BYTES // 4, np.float32)  # data alone fills the limit; the header tips it over
    with pytest.raises(ValueError, match="exceeds the limit"):
        encode_tensor(big, "s", 0, "r")


def frame_parts(sid=b"s1", rid=b"r1", dtype=1, shape=(2, 3), step=7, data=None, magic=b"ARGT", version=1,
                ndim=None, pad=None) -> bytes:
    """A tensor frame assembled by hand, field by field, to corrupt one at a time."""
    ndim = len(shape) if ndim is None else ndim
    head = (struct.pack("<4sBBB", magic, version, dtype, ndim) + struct.pack(f"<{len(shape)}I", *shape)
            + bytes([len(sid)]) + sid + struct.pack("<Q", step) + bytes([len(rid)]) + rid)
    head += (b"\x00" * (-len(head) % 8)) if pad is None else pad
    if data is None:
        data = bytes(int(np.prod(shape)) * TENSOR_DTYPES.get(dtype, np.dtype("f4")).itemsize)
    return head + data


def test_hand_built_frame_matches_the_encoder():
    assert frame_parts() == encode_tensor(np.zeros((2, 3), np.float32), "s1", 7, "r1")


GOOD = frame_parts()
MALFORMED = {
    "empty": b"",
    "prefix only": GOOD[:7],
    "bad magic": frame_parts(magic=b"ARGX"),
    "lowercase magic": frame_parts(magic=b"argt"),
    "header version 0": frame_parts(version=0),
    "header version 2": frame_parts(version=2),
    "dtype code 0": frame_parts(dtype=0),
    "dtype code 6": frame_parts(dtype=6),
    "dtype code 255": frame_parts(dtype=255),
    "ndim 5": frame_parts(shape=(1, 1, 1, 1, 1)),
    "ndim 255, short": frame_parts(ndim=255),
    "ndim says 3, shape has 2": frame_parts(ndim=3),
    "shape product overflows": frame_parts(shape=(2**32 - 1,) * 4, data=b""),
    "shape over the max": frame_parts(shape=(MAX_TENSOR_FRAME_BYTES // 4 + 1,), data=b""),
    "data one byte short": GOOD[:-1],
    "trailing byte": GOOD + b"\x00",
    "data for another shape": frame_parts(shape=(2, 3), data=bytes(20)),
    "zero-length session id": frame_parts(sid=b""),
    "65-byte session id": frame_parts(sid=b"s" * 65),
    "non-ascii session id": frame_parts(sid="sé".encode()),
    "session id with NUL": frame_parts(sid=b"s\x00"),
    "zero-length request id": frame_parts(rid=b""),
    "request id with space": frame_parts(rid=b"r 1"),
    "non-zero padding": frame_parts(pad=b"\x00\x00\x00\x00\x00\x00\x01"),
    "padding missing": frame_parts(pad=b""),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_tensor_frames(name):
    with pytest.raises(ProtocolError) as ei:
        decode_tensor(MALFORMED[name])
    assert ei.value.code == "malformed_frame"


def test_every_truncation_of_a_frame_is_malformed():
    for n in range(len(GOOD)):
        assert code_of(decode_tensor, GOOD[:n]) == "malformed_frame"


def test_tensor_errors_carry_the_request_id_once_read():
    with pytest.raises(ProtocolError) as ei:
        decode_tensor(GOOD + b"\x00")
    assert ei.value.request_id == "r1"
    with pytest.raises(ProtocolError) as ei:
        decode_tensor(frame_parts(magic=b"NOPE"))
    assert ei.value.request_id is None


def test_tensor_frame_must_match_its_message():
    fwd = sample("forward", request_id="req-5")
    check_tensor_for(fwd, decode_tensor(encode_tensor(np.zeros((5, 576), np.float32), SESSION, 0, "req-5")))
    with pytest.raises(InvalidPayload, match="does not match"):
        check_tensor_for(fwd, decode_tensor(encode_tensor(np.zeros(1, np.float32), "net-1.conv-43", 0, "req-5")))
    with pytest.raises(InvalidPayload, match="does not match"):
        check_tensor_for(fwd, decode_tensor(encode_tensor(np.zeros(1, np.float32), SESSION, 0, "req-6")))
    with pytest.raises(InvalidPayload, match="does not carry"):
        check_tensor_for(sample("heartbeat"), decode_tensor(GOOD))
    with pytest.raises(InvalidPayload, match="does not carry"):
        check_tensor_for(sample("session_query"), decode_tensor(encode_tensor(np.zeros(1, np.float32), SESSION, 0,
                                                                              "req-1")))


def test_block_chunk_travels_as_a_u8_tensor_named_by_the_shard():
    """A blocks_chunk's data is a 1-d uint8 tensor frame; its session id names the transfer (blocks-<epoch>)."""
    import hashlib

    data = np.frombuffer(bytes(range(256)) * 16, np.uint8)
    m = make_message("blocks_chunk", {"shard_sha256": SHA_SHARD, "offset": 0,
                                      "sha256": hashlib.sha256(data.tobytes()).hexdigest()},
                     network_id=NET, session_id="blocks-3", timestamp=NOW)
    tf = decode_tensor(encode_tensor(data, m.session_id, 0, m.request_id))
    check_tensor_for(decode(encode_message(m)), tf)
    assert tf.array.dtype == np.uint8 and hashlib.sha256(tf.array).hexdigest() == m.payload["sha256"]
    frame = encode_tensor(np.zeros(MAX_BLOCK_CHUNK, np.uint8), "s" * 64, 0, "r" * 64)
    assert len(frame) <= MAX_TENSOR_FRAME_BYTES  # the largest chunk fits one binary frame


def test_decode_frame_dispatches_on_websockets_types():
    assert isinstance(decode_frame(encode_message(sample("leave")), now=NOW), Message)
    assert isinstance(decode_frame(GOOD), TensorFrame)


# --------------------------------------------------------------------------- size limits


@pytest.mark.parametrize("kind,limit", [("json", MAX_JSON_FRAME_BYTES), ("tensor", MAX_TENSOR_FRAME_BYTES)])
def test_check_frame_size_boundaries(kind, limit):
    check_frame_size(limit, kind)
    with pytest.raises(ProtocolError) as ei:
        check_frame_size(limit + 1, kind)
    assert ei.value.code == "frame_too_large"
    with pytest.raises(ValueError):
        check_frame_size(10, "xml")


def test_oversized_text_frame_is_refused_before_parsing():
    text = "[" * (MAX_JSON_FRAME_BYTES + 1)  # would be malformed if it were parsed
    assert code_of(decode, text) == "frame_too_large"
    assert code_of(decode, text.encode()) == "frame_too_large"
    assert code_of(decode, "é" * (MAX_JSON_FRAME_BYTES // 2 + 1)) == "frame_too_large"  # counted in UTF-8 bytes


def test_oversized_tensor_frame_is_refused_before_parsing():
    assert code_of(decode_tensor, bytes(MAX_TENSOR_FRAME_BYTES + 1)) == "frame_too_large"


def test_encoder_refuses_text_over_the_limit():
    m = Message("join_approved", "r", NET, None, NOW,
                {"certificate_pem": CERT, "ca_pem": CERT, "config": {"blob": "x" * MAX_JSON_FRAME_BYTES}})
    with pytest.raises(ValueError, match="limit"):
        encode_message(m)


def test_websocket_options_turn_compression_off_and_cap_frames():
    assert WEBSOCKET_OPTIONS["compression"] is None
    assert WEBSOCKET_OPTIONS["max_size"] == MAX_FRAME_BYTES == max(MAX_JSON_FRAME_BYTES, MAX_TENSOR_FRAME_BYTES)


async def test_websockets_accepts_the_options_on_loopback():
    """Real websockets on 127.0.0.1: options accepted, no extension negotiated, a tensor and an error travel."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def handler(ws):
        for _ in range(2):
            data = await ws.recv()
            try:
                got = decode_frame(data, now=NOW)
                await ws.send(encode_tensor(got.array * 2, got.session_id, got.step + 1, got.request_id))
            except ProtocolError as e:
                await ws.send(encode_message(error_reply(e, network_id=NET, timestamp=NOW)))

    async with serve(handler, "127.0.0.1", 0, **WEBSOCKET_OPTIONS) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", **WEBSOCKET_OPTIONS) as ws:
            assert ws.subprotocol == SUBPROTOCOL
            assert ws.protocol.extensions == []  # no permessage-deflate
            await ws.send(encode_tensor(np.ones((2, 4), np.float16), "s", 1, "r"))
            t = decode_frame(await ws.recv())
            assert (t.step, t.array.tolist()) == (2, [[2.0] * 4] * 2)
            await ws.send("not json")
            err = decode_frame(await ws.recv(), now=NOW)
            assert err.message_type == "error" and err.payload["code"] == "malformed_frame"


# --------------------------------------------------------------------------- handshake and signatures


MEMBER_OPENING = [(True, "hello"), (False, "challenge"), (True, "challenge"), (True, "challenge_response"),
                  (False, "challenge_response")]  # (sent by the initiator?, type)


def test_member_handshake_in_order_from_both_ends():
    client, server = Handshake(initiator=True), Handshake(initiator=False)
    for by_initiator, t in MEMBER_OPENING:
        assert not client.authenticated and not server.authenticated
        sender, receiver = (client, server) if by_initiator else (server, client)
        sender.sent(t)
        receiver.received(t)
    assert client.authenticated and server.authenticated
    server.received("heartbeat")
    server.received("forward")


@pytest.mark.parametrize("events", [
    [("received", "heartbeat")],  # before hello
    [("received", "challenge")],  # wrong first message
    [("received", "hello"), ("received", "challenge")],  # the responder's challenge comes first
    [("received", "hello"), ("sent", "challenge"), ("received", "challenge_response")],  # no nonce of its own
    [("received", "hello"), ("sent", "challenge"), ("received", "challenge"), ("sent", "challenge_response")],
    [("received", "hello"), ("sent", "challenge"), ("received", "hello")],
    [("received", "hello"), ("sent", "challenge"), ("received", "challenge"), ("received", "challenge_response"),
     ("sent", "challenge_response"), ("received", "hello")],  # no second opening
    [("received", "join_request"), ("received", "heartbeat")],
    [("received", "join_request"), ("sent", "join_approved"), ("received", "join_request")],
])
def test_handshake_out_of_order_is_unexpected(events):
    server = Handshake(initiator=False)
    with pytest.raises(UnexpectedMessage) as ei:
        for direction, t in events:
            getattr(server, direction)(t)
    assert ei.value.code == "unexpected_message"


def test_join_handshake_and_errors_in_any_state():
    server = Handshake(initiator=False)
    server.received("join_request")
    server.sent("join_pending")
    server.sent("error")
    server.sent("join_pending")
    server.sent("join_approved")
    assert server.state == "joined" and not server.authenticated


def test_challenges_carry_the_pki_nonces_and_signatures_both_ways():
    """The payloads hold what worker/pki.py makes: 32-byte nonces, ECDSA P-256 signatures over its context."""
    from worker import pki

    ca_key, ca_cert = pki.create_network_ca(NET, "Test network")
    nodes = {}
    for node_id, role in (("node-a", "worker"), ("admin-1", "admin")):
        key = pki.new_node_key()
        nodes[node_id] = key, pki.sign_node_certificate(ca_key, ca_cert, pki.make_csr(key, node_id, NET), node_id, role)
    (c_key, c_cert), (s_key, s_cert) = nodes["node-a"], nodes["admin-1"]

    def over_the_wire(message_type, payload):
        return decode(encode_message(make_message(message_type, payload, network_id=NET, timestamp=NOW))).payload

    b64, unb64 = (lambda b: base64.b64encode(b).decode()), base64.b64decode
    server_nonce = unb64(over_the_wire("challenge", {"nonce": b64(pki.make_challenge())})["nonce"])
    client_nonce = unb64(over_the_wire("challenge", {"nonce": b64(pki.make_challenge())})["nonce"])
    context = pki.challenge_context(NET, pki.certificate_fingerprint(c_cert), pki.certificate_fingerprint(s_cert),
                                    client_nonce, server_nonce)
    c_sig = over_the_wire("challenge_response", {"signature": b64(pki.sign_challenge(c_key, server_nonce, context))})
    pki.verify_challenge(c_cert, server_nonce, context, unb64(c_sig["signature"]))
    s_sig = over_the_wire("challenge_response", {"signature": b64(pki.sign_challenge(s_key, client_nonce, context))})
    pki.verify_challenge(s_cert, client_nonce, context, unb64(s_sig["signature"]))


def test_join_messages_carry_real_pki_material():
    from worker import pki

    ca_key, ca_cert = pki.create_network_ca(NET, "Test network")
    token = pki.issue_join_token(ca_key, NET, "[fd00::1]:8765", pki.ca_fingerprint(ca_cert))
    csr = pki.make_csr(pki.new_node_key(), "node-" + "x" * 59, NET).decode()
    req = decode(encode_message(make_message(
        "join_request", {"token": token, "csr_pem": csr, "node_id": "node-b", "address": "127.0.0.1:7802", "resources": RESOURCES}, network_id=NET, timestamp=NOW)))
    assert pki.verify_join_token(req.payload["token"], ca_cert).network_id == NET
    cert = pki.sign_node_certificate(ca_key, ca_cert, req.payload["csr_pem"], "node-" + "x" * 59, "worker")
    ok = decode(encode_message(make_message(
        "join_approved", {"certificate_pem": cert.decode(), "ca_pem": pki.pem(ca_cert).decode(), "config": CONFIG},
        network_id=NET, timestamp=NOW)))
    assert pki.node_identity(ok.payload["certificate_pem"].encode()).role == "worker"


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


# --------------------------------------------------------------------------- docs/PROTOCOL.md is exact

DOC = REPO / "docs" / "PROTOCOL.md"


def test_doc_hex_example_is_what_the_encoder_produces():
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- tensor-example -->\n```text\n(.*?)```", text, re.DOTALL).group(1)
    hex_bytes = bytes.fromhex("".join(line.split("  ")[0].split(":", 1)[1] for line in block.splitlines()))
    assert hex_bytes == encode_tensor(np.array([[1.0, -2.0, 0.5]], dtype=np.float32), "s1", 7, "r1")


def test_doc_json_examples_decode_and_cover_every_message_type():
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    types = {decode_message(b, max_skew=None).message_type for b in blocks}
    assert types == set(MESSAGE_TYPES)


def test_doc_lists_every_error_code_and_message_type():
    text = DOC.read_text(encoding="utf-8")
    for name in [*ERROR_CODES, *MESSAGE_TYPES]:
        assert f"`{name}`" in text, name


def test_doc_role_table_is_the_modules():
    """The ✔ table under "## Roles" says exactly who may send what."""
    section = DOC.read_text(encoding="utf-8").split("\n## Roles\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| `")]
    header = next(ln for ln in section.splitlines() if ln.startswith("| message type"))
    roles = [c.strip().strip("`") for c in header.strip("|").split("|")[1:]]
    table = {}
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        table[cells[0].strip("`")] = {r for r, c in zip(roles, cells[1:]) if c == "✔"}
    assert table == {t: set(s.senders) for t, s in MESSAGE_TYPES.items()}


def test_doc_message_sections_state_the_modules_senders():
    """Every message type's section has a "Senders:" sentence naming exactly its senders."""
    text = DOC.read_text(encoding="utf-8")
    for t, spec in MESSAGE_TYPES.items():
        m = re.search(rf"\n#{{3,4}} `{t}`\n(.*?)```json", text, re.DOTALL)
        assert m, f"no section for {t}"
        senders = re.search(r"Senders: (.*?)\.(?: |\n|$)", m.group(1), re.DOTALL)
        assert senders, f"no Senders: sentence for {t}"
        named = set(re.findall(r"`(\w+)`", senders.group(1)))
        assert named == set(spec.senders), t


def test_doc_lists_every_control_command_and_leaves_the_routing_marker():
    text = DOC.read_text(encoding="utf-8")
    for name in CONTROL_COMMANDS:
        assert re.search(rf"^\| `{name}`", text, re.MULTILINE), name
    assert "## Inference, stages and blocks (issue 6)" in text and "<!-- routing-measurements -->" in text


# --------------------------------------------------------------------------- fuzz

FUZZ_NOW = NOW
VALID_TEXTS = [encode_message(sample(t)) for t in sorted(SAMPLES)]
VALID_TENSORS = [encode_tensor(some_array(d, s), "sess-42", 3, "req-1")
                 for d in DTYPES for s in [(), (3,), (2, 2), (1, 2, 1, 2), (0, 3)]]
SPECIAL_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**53, 2**64, 10**30, -0.0, 0.5, 1e308, "", "a" * 64, "a" * 65,
                  "worker", "admin", "joiner", "stop", B64_32, CERT, CSR, "req 1", "\ud800", "é", [], {}, [1] * 8193]


def random_json(rng: random.Random, depth: int = 0):
    """A JSON value: boundary values, random scalars and text, or small nested arrays and objects."""
    r = rng.random()
    if r < 0.35:
        return rng.choice(SPECIAL_VALUES)
    if r < 0.5:
        return rng.randint(-(2**70), 2**70) if rng.random() < 0.5 else rng.uniform(-1e6, 1e6)
    if r < 0.75 or depth >= 3:
        return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0x10FFFF)])) for _ in range(rng.randint(0, 70)))
    if r < 0.88:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {str(random_json(rng, 3)): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


MUTATIONS = ("flip", "truncate", "insert", "delete", "splice", "overwrite")


def mutate(data: bytes, originals: list[bytes], rng: random.Random) -> bytes:
    """``data`` after 1..4 bit flips, truncations, insertions, deletions, overwrites or splices with
    the tail of another valid frame."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, pos = rng.choice(MUTATIONS), rng.randint(0, len(data))
        if op == "flip" and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete":
            del data[pos:pos + rng.randint(1, 16)]
        elif op == "splice":
            other = rng.choice(originals)
            data[pos:] = other[rng.randint(0, len(other)):]
        elif op == "overwrite":
            chunk = rng.randbytes(rng.randint(1, 8))
            data[pos:pos + len(chunk)] = chunk
    return bytes(data)


def mutated(originals: list[bytes]):
    """Strategy: a mutation of one of ``originals``, driven by a drawn seed (few draws keep 10,000 fast)."""
    return st.builds(lambda i, seed: mutate(originals[i], originals, random.Random(seed)),
                     st.integers(0, len(originals) - 1), st.integers(0, 2**64 - 1))


ENVELOPES = [json.loads(t) for t in VALID_TEXTS]


def nested_records(obj: dict) -> list[dict]:
    """The objects nested one level inside ``obj``: records (block_range, sampling) and items of record lists
    (rows, sessions)."""
    out = []
    for v in obj.values():
        if isinstance(v, dict):
            out.append(v)
        elif isinstance(v, list):
            out.extend(x for x in v if isinstance(x, dict))
    return out


def structurally_mutate(obj: dict, rng: random.Random) -> str:
    """A valid envelope with 1..3 fields (envelope, payload, or a record nested in the payload such as
    block_range, sampling, a forward row or a sessions item) deleted, replaced or added."""
    obj = json.loads(json.dumps(obj))
    target = obj if rng.random() < 0.5 or not obj["payload"] else obj["payload"]
    for _ in range(rng.randint(1, 3)):
        inner = nested_records(target) if target is not obj else []
        if inner and rng.random() < 0.5:
            target = rng.choice(inner)
        keys = sorted(target)
        i = rng.randint(0, len(keys))
        key = keys[i] if i < len(keys) else str(random_json(rng, 3))
        if rng.random() < 0.2:
            target.pop(key, None)
        else:
            target[key] = random_json(rng)
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5)


def structural():
    return st.builds(lambda i, seed: structurally_mutate(ENVELOPES[i], random.Random(seed)),
                     st.integers(0, len(ENVELOPES) - 1), st.integers(0, 2**64 - 1))


TENSOR_HEADERISH = st.builds(
    lambda dtype, ndim, rest: b"ARGT\x01" + bytes([dtype, ndim]) + rest,
    st.integers(0, 7), st.integers(0, 6), st.binary(max_size=96),
)
FUZZ_CASES = st.one_of(
    st.tuples(st.just("json-random-text"), st.text(max_size=200)),
    st.tuples(st.just("json-random-bytes"), st.binary(max_size=200)),
    st.tuples(st.just("json-mutated"), mutated([t.encode() for t in VALID_TEXTS])),
    st.tuples(st.just("json-structural"), structural()),
    st.tuples(st.just("tensor-random"), st.binary(max_size=200)),
    st.tuples(st.just("tensor-headerish"), TENSOR_HEADERISH),
    st.tuples(st.just("tensor-mutated"), mutated(VALID_TENSORS)),
)


@contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging) if the body runs longer than ``seconds`` (SIGALRM; main thread)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"example took over {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def decode_or_error_reply(kind: str, data) -> str:
    """Decode ``data``; a valid result must re-encode to itself, an error must make a valid error reply."""
    try:
        if kind.startswith("json"):
            out = decode_message(data, now=FUZZ_NOW)
        else:
            out = decode_tensor(data)
    except ProtocolError as e:
        assert e.code in ERROR_CODES
        r = error_reply(e, network_id=NET, timestamp=FUZZ_NOW)
        assert decode_message(encode_message(r), now=FUZZ_NOW) == r
        return "error"
    if isinstance(out, Message):
        assert decode_message(encode_message(out), now=FUZZ_NOW) == out
    else:
        assert encode_tensor(out.array, out.session_id, out.step, out.request_id) == bytes(data)
    return "ok"


def test_fuzz_decoders_only_ever_decode_or_raise_protocol_error():
    """10,000 random and mutated frames: each decodes to a valid value or becomes an error reply."""
    outcomes: Counter = Counter()

    @settings(max_examples=10_000, derandomize=True, database=None, deadline=1000,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(FUZZ_CASES)
    def run(case):
        kind, data = case
        with time_limit(5.0):
            outcome = decode_or_error_reply(kind, data)
            if kind == "json-mutated":  # the same bytes as a text frame
                decode_or_error_reply(kind, data.decode("utf-8", "replace"))
        outcomes[kind, outcome] += 1

    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    total = sum(outcomes.values())
    print(f"\nfuzz: {total} examples in {elapsed:.1f} s: {dict(sorted(outcomes.items()))}")
    assert total >= 10_000
    for kind in ("json-mutated", "json-structural", "tensor-mutated"):
        assert outcomes[kind, "ok"] > 0 and outcomes[kind, "error"] > 0, kind
