"""Valid examples of every message type, the role table as the issue states it, and helpers,
shared by the protocol tests (``tests/protocol/test_*.py``): the specification by example.
"""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from worker.protocol import (
    Message,
    ProtocolError,
    decode_message,
    encode_message,
    make_message,
)

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
DIGESTS4 = base64.b64encode(bytes(range(64))).decode()  # 4 prefix digests of 16 bytes (one per position)
DIGEST1 = base64.b64encode(bytes(range(100, 116))).decode()
ROWS = [  # a prefill row and a decode row of another conversation, batched, to the first range (token ids)
    {"session_id": SESSION, "start_pos": 0, "n_tokens": 4, "token_ids": PROMPT, "prefix_digests": DIGESTS4},
    {"session_id": "net-1.conv-7", "start_pos": 37, "n_tokens": 1, "token_ids": [314], "prefix_digests": DIGEST1},
]
ROW0, ROW1 = ROWS
#: The same rows as a later range gets them: no token ids, the prefix digests only.
BLIND_ROWS = [r | {"token_ids": None} for r in ROWS]
LATER_RANGE = RANGE | {"start": 15, "end": 30}
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
    "forward_result": ({"block_range": LATER_RANGE, "rows": BLIND_ROWS}, SESSION),
    "session_query": ({"prefix_digests": DIGESTS4}, SESSION),
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


DTYPES = [np.float32, np.float16, np.int32, np.int64, np.uint8]


def some_array(dtype, shape) -> np.ndarray:
    rng = np.random.default_rng(abs(hash((np.dtype(dtype).str, shape))) % 2**32)
    a = rng.standard_normal(shape) * 100
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=shape, endpoint=True)
    return np.asarray(a).astype(dtype)
