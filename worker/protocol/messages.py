"""Message types: each one's payload schema, session rule, tensor rule and allowed senders.

``MESSAGE_TYPES`` is the role table and the schema table in one: ``authorize``
checks a peer's role against a type's senders, ``validate_payload`` checks a
payload against its schema and cross-field rules. The payload records shared by
several types (``BLOCK_RANGE``, ``FORWARD_ROWS``, ``SAMPLING_FIELDS``,
``SESSION_FIELDS``) and the wire form of ``worker.engine.block_range.BlockRange``
are defined here too.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Optional

from worker.protocol.control import validate_control
from worker.protocol.errors import ERROR_CODES, InvalidPayload, NotAuthorized, UnknownMessageType
from worker.protocol.limits import CHALLENGE_NONCE_BYTES, MAX_INPUT_IDS, MAX_POSITION, MAX_TOKEN_ID, MAX_TOTAL_LENGTH
from worker.protocol.schema import (B64, Bool, Field, FlatObject, Id, Int, IntList, JsonObject, Num, Record, RecordList,
                                    Str, check_schema, safe_repr)

if TYPE_CHECKING:  # imported where used: importing worker.engine loads the tokenizer stack
    from worker.engine.block_range import BlockRange

# Roles: who may send what (MessageSpec.senders). A peer's role comes from its certificate.
ADMIN, WORKER, BACKUP, JOINER, CONTROL = "admin", "worker", "backup", "joiner", "control"
MEMBER_ROLES = frozenset({ADMIN, WORKER, BACKUP})  # from the peer's certificate
# JOINER: a peer without a member certificate. CONTROL: the chat server (or the
# ``python -m worker`` CLI) on a daemon's local control endpoint, whose own CA
# issues only that role; network CAs never issue it.
ROLES = MEMBER_ROLES | {JOINER, CONTROL}
AUTHENTICATED_ROLES = MEMBER_ROLES | {CONTROL}  # roles that prove a key in the opening


# The wire form of worker.engine.block_range.BlockRange: blocks [start, end) of a model with `total` blocks.
BLOCK_RANGE = Record(fields={
    "model_id": Str(max_len=256),
    "start": Int(hi=MAX_POSITION),
    "end": Int(hi=MAX_POSITION),
    "total": Int(hi=MAX_POSITION),
})


def block_range_to_wire(r: "BlockRange") -> dict:
    """The ``block_range`` payload record (``BLOCK_RANGE``) of a BlockRange."""
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

# Limits and records shared by several message types (stages, sessions, block distribution).
MAX_FORWARD_ROWS = 64  # sessions batched into one forward
MAX_BLOCK_CHUNK = 8 << 20  # bytes of shard data in one blocks_chunk frame
BLOCK_STATES = ("need", "receiving", "verified", "loaded", "failed")
SAMPLING_FIELDS = {
    "temperature": Num(lo=0.0, hi=5.0, nullable=True), "top_p": Num(lo=0.0, hi=1.0, nullable=True),
    "top_k": Int(lo=0, hi=MAX_TOKEN_ID, nullable=True), "seed": Int(nullable=True),
    "repetition_penalty": Num(lo=0.01, hi=10.0, nullable=True), "ignore_eos": Bool(nullable=True),
}
#: Bytes of one position's prefix digest (``worker.inference.prefix_digests``: HMAC-SHA-256 cut to 128 bits).
PREFIX_DIGEST_BYTES = 16
# One row of a (batched) forward: positions start_pos .. start_pos+n_tokens-1 of one session. Only the
# first range (block_range.start == 0) may be sent the token ids of those positions (it embeds them);
# every range gets the positions' prefix digests, which its paged KV cache records so that a resumed
# session is checked without the stage learning the text.
FORWARD_ROWS = RecordList(fields={
    "session_id": Id(), "start_pos": Int(hi=MAX_TOTAL_LENGTH), "n_tokens": Int(lo=1, hi=MAX_INPUT_IDS),
    "token_ids": IntList(max_items=MAX_INPUT_IDS, hi=MAX_TOKEN_ID, nullable=True),
    "prefix_digests": B64(min_bytes=PREFIX_DIGEST_BYTES, max_bytes=MAX_INPUT_IDS * PREFIX_DIGEST_BYTES,
                          nullable=True),
}, min_items=1, max_items=MAX_FORWARD_ROWS)
SESSION_FIELDS = {
    "session_id": Str(max_len=128), "n_tokens": Int(), "bytes": Int(), "saved_at": Num(lo=0.0, nullable=True),
    "in_memory": Bool(), "block_range": Str(max_len=64, min_len=0),
}


def _digest_count(b64_value: str) -> int:
    """Digests in a validated B64 field, or -1 if its length is not a whole number of them."""
    n = len(base64.b64decode(b64_value))
    return n // PREFIX_DIGEST_BYTES if n % PREFIX_DIGEST_BYTES == 0 else -1


def _valid_forward(p: dict) -> None:
    _valid_block_range(p)
    first = p["block_range"]["start"] == 0
    seen = set()
    for i, r in enumerate(p["rows"]):
        if r["token_ids"] is not None:
            if not first:
                raise InvalidPayload(f"payload.rows[{i}].token_ids: token ids go only to the first blocks (start 0); "
                                     f"blocks from {p['block_range']['start']} get hidden states and prefix digests")
            if len(r["token_ids"]) != r["n_tokens"]:
                raise InvalidPayload(f"payload.rows[{i}].token_ids has {len(r['token_ids'])} ids; n_tokens is {r['n_tokens']}")
        if r["prefix_digests"] is not None and _digest_count(r["prefix_digests"]) != r["n_tokens"]:
            raise InvalidPayload(f"payload.rows[{i}].prefix_digests must be {r['n_tokens']} digests of "
                                 f"{PREFIX_DIGEST_BYTES} bytes (one per position)")
        if r["session_id"] in seen:
            raise InvalidPayload(f"payload.rows[{i}]: session {r['session_id']} appears twice in one forward")
        seen.add(r["session_id"])


def _valid_session_query(p: dict) -> None:
    if _digest_count(p["prefix_digests"]) < 0:
        raise InvalidPayload(f"payload.prefix_digests must be whole digests of {PREFIX_DIGEST_BYTES} bytes")


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
        "prefix_digests": B64(min_bytes=0, max_bytes=MAX_TOTAL_LENGTH * PREFIX_DIGEST_BYTES),
    }, session="required", check=_valid_session_query),
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
    }, check=validate_control),
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
        raise UnknownMessageType(f"message_type {safe_repr(message_type)} is not defined")
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
        raise UnknownMessageType(f"message_type {safe_repr(message_type)} is not defined")
    if role not in spec.senders:
        raise NotAuthorized(f"role {safe_repr(role)} may not send {message_type}; allowed: {', '.join(sorted(spec.senders))}")


__all__ = [
    "ADMIN", "AUTHENTICATED_ROLES", "BACKUP", "BLOCK_RANGE", "BLOCK_STATES", "CONTROL", "FORWARD_ROWS", "JOINER",
    "MAX_BLOCK_CHUNK", "MAX_FORWARD_ROWS", "MEMBER_ROLES", "MESSAGE_TYPES", "MessageSpec", "PREFIX_DIGEST_BYTES", "ROLES", "SAMPLING_FIELDS",
    "SESSION_FIELDS", "Session", "WORKER", "authorize", "block_range_from_wire", "block_range_to_wire",
    "validate_payload",
]
