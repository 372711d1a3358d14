"""Fuzzing the decoders (worker/protocol/envelope.py, tensor.py): 10,000 random and mutated
frames either decode to a valid value or become a valid error reply, never anything else.
"""
from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from contextlib import contextmanager

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.protocol import (
    ERROR_CODES,
    Message,
    ProtocolError,
    decode_message,
    decode_tensor,
    encode_message,
    encode_tensor,
    error_reply,
)

from tests.protocol.samples import (
    B64_32,
    CERT,
    CSR,
    DTYPES,
    NET,
    NOW,
    SAMPLES,
    sample,
    some_array,
)

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
