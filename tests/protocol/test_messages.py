"""Message types (worker/protocol/messages.py): every type by example, session and tensor rules,
payload schemas and limits, the role table, the control commands.
"""
from __future__ import annotations

import base64
import json
import re

import pytest

from worker.engine.block_range import BlockRange
from worker.protocol import (
    BLOCK_STATES,
    CONTROL_COMMANDS,
    MAX_BLOCK_CHUNK,
    MAX_FORWARD_ROWS,
    MAX_ID_CHARS,
    MAX_INPUT_IDS,
    MAX_JSON_FRAME_BYTES,
    MAX_TOTAL_LENGTH,
    MESSAGE_TYPES,
    InvalidPayload,
    Message,
    NotAuthorized,
    UnknownMessageType,
    authorize,
    block_range_from_wire,
    block_range_to_wire,
    encode_message,
    make_message,
)

from tests.protocol.samples import (
    B64_32,
    CERT,
    CSR,
    NET,
    NOW,
    RANGE,
    ROLES,
    ROW0,
    ROW1,
    ROWS,
    BLIND_ROWS,
    DIGEST1,
    LATER_RANGE,
    SAMPLES,
    SAMPLING,
    SENDERS,
    SESSION,
    SESSION_ROW,
    USAGE,
    code_of,
    decode,
    sample,
    wire,
)

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


def test_block_range_travels_as_the_engine_value():
    r = BlockRange("smollm2-135M-32c0b8179c87", 15, 30, 30)
    m = make_message("forward", {"block_range": block_range_to_wire(r), "rows": BLIND_ROWS}, network_id=NET,
                     session_id="s", timestamp=NOW)
    assert block_range_from_wire(decode(encode_message(m)).payload["block_range"]) == r
    assert r.is_last and not r.is_first


def test_forward_batches_at_most_max_forward_rows_sessions():
    rows = [{"session_id": f"net-1.c{i}", "start_pos": i, "n_tokens": 1, "token_ids": [i], "prefix_digests": DIGEST1}
            for i in range(64)]
    assert MAX_FORWARD_ROWS == 64
    m = make_message("forward", {"block_range": RANGE, "rows": rows}, network_id=NET, session_id="batch-1")
    assert [r["session_id"] for r in decode(encode_message(m), max_skew=None).payload["rows"]] == [
        f"net-1.c{i}" for i in range(64)]
    with pytest.raises(ValueError, match=r"payload\.rows must have 1\.\.64 items, got 65"):
        make_message("forward", {"block_range": RANGE, "rows": rows + [rows[0] | {"session_id": "x"}]},
                     network_id=NET, session_id="batch-1")


def test_a_full_length_prefill_forward_fits_one_text_frame():
    """8192 token ids of the largest value and their 8192 prefix digests still encode under the 1 MiB
    text-frame limit, and so does a session_query of the longest sequence."""
    ids = [2**31 - 1] * MAX_INPUT_IDS
    row = {"session_id": SESSION, "start_pos": MAX_TOTAL_LENGTH - MAX_INPUT_IDS, "n_tokens": MAX_INPUT_IDS,
           "token_ids": ids, "prefix_digests": base64.b64encode(b"\xff" * 16 * MAX_INPUT_IDS).decode()}
    query = make_message("session_query", {"prefix_digests": base64.b64encode(b"\xff" * 16 * MAX_TOTAL_LENGTH).decode()},
                         network_id=NET, session_id=SESSION)
    assert len(encode_message(query).encode()) < MAX_JSON_FRAME_BYTES
    text = encode_message(make_message("forward", {"block_range": RANGE, "rows": [row]}, network_id=NET,
                                       session_id=SESSION))
    assert len(text.encode()) < MAX_JSON_FRAME_BYTES


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
    ("forward_result", {"rows": [BLIND_ROWS[1], BLIND_ROWS[1]]}, "payload.rows[1]: session net-1.conv-7 appears twice in one forward"),
    ("forward_result", {"block_range": RANGE, "rows": [ROW1 | {"token_ids": []}]}, "payload.rows[0].token_ids must have 1..8192 items, got 0"),
    # token ids go to the first range only: a later range gets hidden states and prefix digests
    ("forward", {"block_range": LATER_RANGE}, "payload.rows[0].token_ids: token ids go only to the first blocks (start 0)"),
    ("forward_result", {"rows": ROWS}, "payload.rows[0].token_ids: token ids go only to the first blocks"),
    ("forward", {"block_range": LATER_RANGE, "rows": BLIND_ROWS}, None),
    ("forward", {"rows": [ROW0 | {"token_ids": None}]}, None),  # the first range may do without them too
    ("forward", {"rows": [ROW0 | {"prefix_digests": None}]}, None),  # a stage then records no marks: no resume
    ("forward", {"rows": [ROW0 | {"prefix_digests": DIGEST1}]}, "payload.rows[0].prefix_digests must be 4 digests of 16 bytes"),
    ("forward", {"rows": [ROW0 | {"prefix_digests": base64.b64encode(bytes(65)).decode()}]},
     "payload.rows[0].prefix_digests must be 4 digests of 16 bytes"),
    ("forward", {"rows": [ROW0 | {"prefix_digests": "not base64!"}]}, "payload.rows[0].prefix_digests is not valid base64"),
    ("forward", {"rows": [{k: v for k, v in ROW0.items() if k != "prefix_digests"}]}, "payload.rows[0].prefix_digests is missing"),
    ("forward_result", {"block_range": RANGE | {"start": 30, "end": 31}}, "outside the model's 30 blocks"),
    ("session_query", {"prefix_digests": ""}, None),  # what is cached, whatever the prefix
    ("session_query", {"prefix_digests": base64.b64encode(bytes(16 * MAX_TOTAL_LENGTH)).decode()}, None),
    ("session_query", {"prefix_digests": base64.b64encode(bytes(16 * MAX_TOTAL_LENGTH + 16)).decode()},
     "payload.prefix_digests is longer than base64 of 262144 bytes"),
    ("session_query", {"prefix_digests": base64.b64encode(bytes(17)).decode()}, "payload.prefix_digests must be whole digests of 16"),
    ("session_query", {"token_ids": [1, 2, 3]}, "payload has unknown field(s) 'token_ids'"),  # the text never goes to a stage
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
