"""What a worker learns of a conversation (issue 13, finding 11): the admin's prefix digests
and the chain that sends token ids to the first range only."""
from __future__ import annotations

import base64

import numpy as np

from worker import protocol
from worker.engine import BlockRange
from worker.inference import Chain, DecodeBatcher, prefix_digests
from worker.protocol.messages import PREFIX_DIGEST_BYTES
from worker.stage_host import StageHost

KEY = bytes(range(32))


def test_digests_name_a_prefix_of_one_session_under_one_key():
    ids = [1, 9690, 198, 2683, 359]
    d, state = prefix_digests(KEY, "net-1.c1", ids)
    assert len(d) == len(ids) and all(len(x) == PREFIX_DIGEST_BYTES == 16 for x in d)
    assert len(set(d)) == len(d)  # every position differs, even for repeated tokens
    assert prefix_digests(KEY, "net-1.c1", ids)[0] == d  # deterministic
    # continuing from the state gives the digests of the whole sequence
    more, _ = prefix_digests(KEY, "net-1.c1", [42, 7], state)
    assert prefix_digests(KEY, "net-1.c1", ids + [42, 7])[0] == d + more
    # a change at position 2 changes every digest from 2 on, and none before
    other = prefix_digests(KEY, "net-1.c1", [1, 9690, 199, 2683, 359])[0]
    assert other[:2] == d[:2] and all(a != b for a, b in zip(other[2:], d[2:]))
    # another session, another key: nothing in common (same prompt, different conversations)
    assert not set(prefix_digests(KEY, "net-1.c2", ids)[0]) & set(d)
    assert not set(prefix_digests(bytes(32), "net-1.c1", ids)[0]) & set(d)
    # the digests do not contain the token ids in any encoding
    blob = b"".join(d)
    for dt in ("<i4", "<i8", ">i4", ">i8"):
        assert np.asarray(ids[:3], dt).tobytes() not in blob


def test_the_digest_key_is_derived_from_the_network_key_and_differs_from_it(tmp_path):
    key = bytes(range(1, 33))
    a = StageHost(tmp_path / "a", "net-1", key)
    b = StageHost(tmp_path / "b", "net-1", key)
    c = StageHost(tmp_path / "c", "net-1", bytes(32))
    try:
        assert a.prefix_key == b.prefix_key != c.prefix_key and a.prefix_key != key and len(a.prefix_key) == 32
    finally:
        for h in (a, b, c):
            h.close()


class FakeStage:
    def __init__(self, start, end, total=30):
        self.block_range = BlockRange("m", start, end, total)
        self.seen: list[list[dict]] = []

    async def forward(self, rows, x):
        self.seen.append(rows)
        return np.zeros((len(rows), 4), np.float32) if self.block_range.is_last else np.zeros((len(x), 4), np.float32)


async def test_the_chain_sends_token_ids_to_the_first_range_only():
    stages = [FakeStage(0, 10), FakeStage(10, 20), FakeStage(20, 30)]
    d, _ = prefix_digests(KEY, "net-1.c1", [5, 6, 7])
    row = {"session_id": "net-1.c1", "start_pos": 0, "n_tokens": 3, "token_ids": [5, 6, 7],
           "prefix_digests": protocol.b64(b"".join(d))}
    await Chain(stages).forward([row], np.asarray([5, 6, 7], np.int32))
    assert stages[0].seen == [[row]]
    for s in stages[1:]:
        assert s.seen == [[row | {"token_ids": None}]]
        protocol.validate_payload("forward", {"block_range": protocol.block_range_to_wire(s.block_range),
                                              "rows": s.seen[0]})
    assert row["token_ids"] == [5, 6, 7]  # the caller's row is not changed


async def test_decode_rows_carry_the_positions_digest():
    got = []

    async def run(rows, ids):
        got.append((rows, ids.tolist()))
        return np.zeros((len(rows), 8), np.float32)

    b = DecodeBatcher(run, window_s=0.0)
    digest = bytes(range(16))
    await b.step("net-1.c1", 7, 42, digest)
    [(rows, ids)] = got
    assert ids == [42] and rows[0]["token_ids"] == [42]
    assert base64.b64decode(rows[0]["prefix_digests"]) == digest and rows[0]["start_pos"] == 7
