"""The stage host on the real model: batched forward rows give the logits of the plain stage
(whole model and split over two hosts), sessions are saved, found again after a restart
without recomputing their prefix, listed and dropped, memory is bounded, a new range keeps the
old sessions apart; and the message adapter answers stage and block messages on a link."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging

import numpy as np
import pytest

from tests.support.reference import reference, reference_logits
from worker import protocol
from worker.crypto_at_rest import decrypt_blob, generate_key
from worker.engine import BlockRange, ModelFile, Stage, default_model_path
from worker.protocol import SESSION_FIELDS, check_schema
from worker.inference import prefix_digests
from worker.stage_host import StageHost, StageNotLoaded, WrongBlockRange, session_aad

NET = "net-home"
FRANCE, PERSIAN = reference("france"), reference("persian_greeting")


@pytest.fixture(scope="module")
def mf():
    return ModelFile(default_model_path())


@pytest.fixture(scope="module")
def plain_stage(mf):
    """The whole model as one plain Stage (in-memory KVCache): what the host must match."""
    return Stage.from_model_file(mf, BlockRange.whole(mf.model_id, mf.config.n_block))


@pytest.fixture
def key():
    return generate_key()


def rng(mf, start, end) -> BlockRange:
    return BlockRange(mf.model_id, start, end, mf.config.n_block)


DIGEST_KEY = bytes(range(32))  # the admin's prefix-digest key in these tests
_TRANSCRIPT: dict[str, list[int]] = {}  # session -> the tokens its rows have covered (for the digest chain)


def digests_of(session_id: str, ids) -> list[bytes]:
    """The prefix digests of ``ids`` in ``session_id``, as the admin computes them."""
    return prefix_digests(DIGEST_KEY, session_id, [int(t) for t in ids])[0]


def row(session_id: str, start_pos: int, ids) -> dict:
    """A forward row as the admin builds it for the first range: token ids and prefix digests."""
    ids = [int(t) for t in ids]
    seq = _TRANSCRIPT[session_id] = _TRANSCRIPT.get(session_id, [])[:start_pos] + ids
    digests = digests_of(session_id, seq)[start_pos:] if len(seq) == start_pos + len(ids) else None
    return {"session_id": session_id, "start_pos": start_pos, "n_tokens": len(ids), "token_ids": ids,
            "prefix_digests": protocol.b64(b"".join(digests)) if digests else None}


def blind(rows) -> list[dict]:
    """The rows as a later range gets them (``inference.Chain``): no token ids."""
    return [{**r, "token_ids": None} for r in rows]


async def host_for(tmp_path, key, mf, start, end, name="node", model=None, **limits) -> StageHost:
    """A StageHost in ``tmp_path/name`` with blocks [start, end) loaded from ``model`` (default: the open ``mf``)."""
    host = StageHost(tmp_path / name, NET, key, **limits)
    await host.load_from_model(mf if model is None else model, rng(mf, start, end))
    return host


async def chain_forward(hosts, rows):
    """Run rows through hosts in order; x starts as the rows' token ids (int32, as the admin sends)."""
    x = np.concatenate([np.asarray(r["token_ids"], np.int32) for r in rows])
    for h in hosts:
        x = await h.forward(rows if h.block_range.is_first else blind(rows), x)
    return x


async def greedy(hosts, session_id, prompt, n):
    logits = (await chain_forward(hosts, [row(session_id, 0, prompt)]))[0]
    out, pos = [], len(prompt)
    while len(out) < n:
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = (await chain_forward(hosts, [row(session_id, pos, [tok])]))[0]
        pos += 1
    return out


# --------------------------------------------------------------------------- forward


async def test_forward_rows_give_the_logits_of_the_plain_stage(tmp_path, key, mf, plain_stage):
    host = await host_for(tmp_path, key, mf, 0, mf.config.n_block)
    try:
        expect_fr = plain_stage.forward("plain-fr", np.asarray(FRANCE["prompt_ids"]), 0)[0]
        expect_fa = plain_stage.forward("plain-fa", np.asarray(PERSIAN["prompt_ids"]), 0)[0]
        one = await chain_forward([host], [row("fr", 0, FRANCE["prompt_ids"])])
        assert one.shape == (1, mf.config.vocab_size) and one.dtype == np.float32 and one.flags.c_contiguous
        np.testing.assert_allclose(one[0], expect_fr, atol=1e-4)
        np.testing.assert_allclose(one[0], reference_logits("france"), atol=1e-3)
        both = await chain_forward([host], [row("fr2", 0, FRANCE["prompt_ids"]), row("fa", 0, PERSIAN["prompt_ids"])])
        assert both.shape == (2, mf.config.vocab_size)
        np.testing.assert_allclose(both[0], expect_fr, atol=1e-4)
        np.testing.assert_allclose(both[1], expect_fa, atol=1e-4)
    finally:
        host.close()


async def test_two_hosts_split_the_model_and_generate_the_reference_tokens(tmp_path, key, mf):
    first = await host_for(tmp_path, key, mf, 0, 13, name="a")
    last = await host_for(tmp_path, key, mf, 13, mf.config.n_block, name="b")
    try:
        hidden = await first.forward([row("s", 0, FRANCE["prompt_ids"])], np.asarray(FRANCE["prompt_ids"], np.int32))
        assert hidden.shape == (len(FRANCE["prompt_ids"]), mf.config.d_model) and hidden.dtype == np.float32
        first.stage.drop_session("s")
        assert await greedy([first, last], "fr", FRANCE["prompt_ids"], 12) == FRANCE["greedy_ids"][:12]
    finally:
        first.close()
        last.close()


async def test_forward_refuses_without_a_stage_for_another_range_or_with_mismatched_rows(tmp_path, key, mf):
    host = StageHost(tmp_path / "node", NET, key)
    ids = np.asarray([1, 2, 3], np.int32)
    with pytest.raises(StageNotLoaded, match="holds no blocks"):
        await host.forward([row("s", 0, ids)], ids)
    await host.load_from_model(mf, rng(mf, 0, 2))
    try:
        with pytest.raises(WrongBlockRange, match="not"):
            await host.forward([row("s", 0, ids)], ids, block_range=rng(mf, 0, 3))
        with pytest.raises(ValueError, match="cover 2 positions"):
            await host.forward([row("s", 0, ids[:2])], ids)
        with pytest.raises(ValueError, match="differ from the rows"):
            await host.forward([row("s", 0, [1, 2, 4])], ids)
        with pytest.raises(ValueError, match="appears twice"):
            await host.forward([row("s", 0, [1]), row("s", 1, [2, 3])], ids)
        assert host.memory_sessions() == []
    finally:
        host.close()


# --------------------------------------------------------------------------- sessions


async def test_saved_session_resumes_after_restart_without_recompute(tmp_path, key, mf):
    prompt = FRANCE["prompt_ids"]
    nxt = FRANCE["greedy_ids"][0]
    before = await host_for(tmp_path, key, mf, 0, mf.config.n_block)
    await chain_forward([before], [row("conv-1", 0, prompt)])
    assert await before.session_save("conv-1") is True
    assert await before.session_save("never-seen") is False
    expected = (await chain_forward([before], [row("conv-1", len(prompt), [nxt])]))[0]
    before.close()

    after = await host_for(tmp_path, key, mf, 0, mf.config.n_block, model=mf.path)  # the daemon restarted
    try:
        assert after.memory_sessions() == []
        cached, n_tokens = await after.session_query("conv-1", digests_of("conv-1", prompt + [nxt]))
        assert (cached, n_tokens) == (len(prompt), len(prompt))
        assert after.stage.session_cache("conv-1").computed_positions == 0  # loaded, not recomputed
        logits = (await chain_forward([after], [row("conv-1", cached, [nxt])]))[0]
        assert after.stage.session_cache("conv-1").computed_positions == 1  # only the new token ran
        np.testing.assert_allclose(logits, expected, atol=1e-5)
        assert await after.session_query("other", digests_of("other", prompt)) == (0, 0)
    finally:
        after.close()


async def test_drop_forgets_a_session_in_memory_and_on_disk(tmp_path, key, mf):
    host = await host_for(tmp_path, key, mf, 0, 2)
    try:
        await chain_forward([host], [row("conv-1", 0, [1, 2, 3, 4])])
        await host.session_save("conv-1")
        saved = host.session_store.path_for("conv-1")
        assert saved.exists()
        assert await host.session_drop("conv-1") is True
        assert not saved.exists() and host.memory_sessions() == []
        assert await host.session_drop("conv-1") is False
        assert await host.session_query("conv-1", digests_of("conv-1", [1, 2, 3, 4])) == (0, 0)
    finally:
        host.close()


async def test_sessions_lists_saved_and_in_memory_sessions_in_protocol_form(tmp_path, key, mf):
    host = await host_for(tmp_path, key, mf, 0, 2)
    try:
        await chain_forward([host], [row("saved-one", 0, [1, 2, 3]), row("memory-only", 0, [5, 6])])
        await host.session_save("saved-one")
        host.stage.drop_session("saved-one")  # only on disk now
        listing = await host.sessions()
        for entry in listing:
            check_schema(SESSION_FIELDS, entry)
        by_id = {e["session_id"]: e for e in listing}
        assert set(by_id) == {"saved-one", "memory-only"}
        assert by_id["saved-one"]["in_memory"] is False and by_id["saved-one"]["n_tokens"] == 3
        assert by_id["saved-one"]["bytes"] == host.session_store.path_for("saved-one").stat().st_size
        assert by_id["saved-one"]["saved_at"] > 0 and by_id["saved-one"]["block_range"] == "0-1"
        assert by_id["memory-only"]["in_memory"] is True and by_id["memory-only"]["saved_at"] is None
        assert by_id["memory-only"]["n_tokens"] == 2 and by_id["memory-only"]["bytes"] > 0
    finally:
        host.close()


async def test_memory_over_the_limit_saves_and_releases_the_least_recently_used(tmp_path, key, mf):
    host = await host_for(tmp_path, key, mf, 0, 2, max_memory_bytes=1)
    try:
        await chain_forward([host], [row("old", 0, [1, 2, 3])])
        await chain_forward([host], [row("new", 0, [4, 5])])
        assert host.memory_sessions() == ["new"]
        assert "old" in host.session_store
        assert await host.session_query("old", digests_of("old", [1, 2, 3, 9])) == (3, 3)
        assert host.stage.session_cache("old").computed_positions == 0
    finally:
        host.close()


async def test_a_new_range_keeps_old_sessions_apart_and_drop_reaches_them(tmp_path, key, mf):
    host = await host_for(tmp_path, key, mf, 0, 2)
    try:
        await chain_forward([host], [row("conv-1", 0, [1, 2, 3])])
        await host.session_save("conv-1")
        old_file = host.session_store.path_for("conv-1")
        await host.load_from_model(mf, rng(mf, 0, 3))  # the placement moved
        assert host.block_range == rng(mf, 0, 3)
        assert old_file.exists() and old_file.parent != host.session_store.directory
        assert await host.session_query("conv-1", digests_of("conv-1", [1, 2, 3])) == (0, 0)  # incompatible: not used
        listing = await host.sessions()
        assert [(e["session_id"], e["block_range"], e["in_memory"]) for e in listing] == [("conv-1", "0-1", False)]
        assert await host.session_drop("conv-1") is True
        assert not old_file.exists()
    finally:
        host.close()


# --------------------------------------------------------------------------- the link adapter


class RecordingLink:
    """The sending side of worker.link.Link, recording instead of sending: answers are built
    with protocol.reply (so their payloads are validated) and tensors go through a real frame."""

    network_id = NET

    def __init__(self):
        self.sent: list[protocol.Message] = []

    async def reply(self, to, message_type, payload=None, *, tensor=None):
        m = protocol.reply(to, message_type, payload)
        if m.spec.tensor != (tensor is not None):
            raise ValueError(f"{message_type} {'needs' if m.spec.tensor else 'takes no'} tensor frame")
        frame = None
        if tensor is not None:
            frame = protocol.decode_tensor(protocol.encode_tensor(tensor, m.session_id, 0, m.request_id))
        self.sent.append(dataclasses.replace(m, tensor=frame))

    async def send_error(self, exc, request_id=None):
        self.sent.append(protocol.error_reply(exc, request_id, network_id=self.network_id))

    def last(self) -> protocol.Message:
        return self.sent[-1]


def incoming(message_type, payload=None, *, session_id=None, tensor=None) -> protocol.Message:
    """A message as Link.recv returns it (validated; with its decoded tensor frame)."""
    m = protocol.make_message(message_type, payload, network_id=NET, session_id=session_id)
    if tensor is not None:
        m = dataclasses.replace(m, tensor=protocol.decode_tensor(
            protocol.encode_tensor(tensor, m.session_id, 0, m.request_id)))
    return m


async def send_shard(host, link, shard, chunk_bytes, epoch=1):
    offer = {"epoch": epoch, "model_sha256": shard.model_sha256,
             "block_range": protocol.block_range_to_wire(shard.block_range), "shard_sha256": shard.sha256,
             "shard_bytes": len(shard.data), "chunk_bytes": chunk_bytes}
    assert await host.handle(link, incoming("blocks_offer", offer))
    status = link.last().payload
    have = status["have_bytes"]
    while status["state"] in ("need", "receiving"):
        piece = shard.data[have:have + chunk_bytes]
        payload = {"shard_sha256": shard.sha256, "offset": have, "sha256": hashlib.sha256(piece).hexdigest()}
        await host.handle(link, incoming("blocks_chunk", payload, session_id=f"blocks-{epoch}",
                                         tensor=np.frombuffer(piece, np.uint8)))
        assert link.last().message_type == "blocks_status", link.last().payload
        status = link.last().payload
        have = status["have_bytes"]
    return status


async def test_blocks_sent_over_the_link_are_loaded_and_run_the_last_blocks(tmp_path, key, mf):
    from worker.engine.shardfile import build_shard

    tail = rng(mf, 28, mf.config.n_block)
    shard = build_shard(mf, tail)
    admin = await host_for(tmp_path, key, mf, 0, 28, name="admin")
    worker, link = StageHost(tmp_path / "worker", NET, key), RecordingLink()
    try:
        status = await send_shard(worker, link, shard, chunk_bytes=8 << 20)
        assert status["state"] == "loaded" and status["have_bytes"] == len(shard.data)
        assert worker.block_range == tail and worker.shard_sha256 == shard.sha256
        assert worker.session_store.directory.name == shard.sha256[:16]
        chunks = sum(1 for m in link.sent if m.request_id and m.message_type == "blocks_status")
        assert chunks == 1 + -(-len(shard.data) // (8 << 20))

        prompt = FRANCE["prompt_ids"]
        rows = [row("fr", 0, prompt)]
        hidden = await admin.forward(rows, np.asarray(prompt, np.int32))
        fwd = incoming("forward", {"block_range": protocol.block_range_to_wire(tail), "rows": blind(rows)},
                       session_id="fr", tensor=hidden)
        assert await worker.handle(link, fwd)
        answer = link.last()
        assert answer.message_type == "forward_result" and answer.request_id == fwd.request_id
        assert answer.payload["rows"] == blind(rows) and answer.tensor.array.dtype == np.float32
        assert (worker.forward_rows, worker.token_id_rows) == (1, 0)
        np.testing.assert_allclose(answer.tensor.array[0], reference_logits("france"), atol=1e-3)

        again = await send_shard(worker, link, shard, chunk_bytes=8 << 20, epoch=2)  # nothing resent
        assert again["state"] == "loaded" and link.sent[-1].message_type == "blocks_status"
    finally:
        admin.close()
        worker.close()

    restarted, link = StageHost(tmp_path / "worker", NET, key), RecordingLink()
    try:
        status = await send_shard(restarted, link, shard, chunk_bytes=8 << 20)
        assert status["state"] == "loaded" and len(link.sent) == 1  # the offer alone: loaded from disk
        assert restarted.block_range == tail
    finally:
        restarted.close()


async def test_session_messages_are_answered_with_session_info_and_sessions_response(tmp_path, key, mf):
    host, link = await host_for(tmp_path, key, mf, 0, 2), RecordingLink()
    try:
        await chain_forward([host], [row("conv-1", 0, [1, 2, 3])])
        await host.handle(link, incoming("session_save", session_id="conv-1"))
        assert link.last().payload == {"cached_tokens": 3, "n_tokens": 3, "saved": True}
        query = {"prefix_digests": protocol.b64(b"".join(digests_of("conv-1", [1, 2, 7])))}
        await host.handle(link, incoming("session_query", query, session_id="conv-1"))
        assert link.last().message_type == "session_info"
        assert link.last().payload == {"cached_tokens": 2, "n_tokens": 3, "saved": True}
        await host.handle(link, incoming("sessions_request"))
        assert [s["session_id"] for s in link.last().payload["sessions"]] == ["conv-1"]
        await host.handle(link, incoming("session_drop", session_id="conv-1"))
        assert link.last().payload == {"cached_tokens": 0, "n_tokens": 0, "saved": True}  # it held conv-1
        await host.handle(link, incoming("sessions_request"))
        assert link.last().payload["sessions"] == []
        await host.handle(link, incoming("session_drop", session_id="conv-1"))
        assert link.last().payload == {"cached_tokens": 0, "n_tokens": 0, "saved": False}  # nothing left
        assert all(m.session_id in (None, "conv-1") for m in link.sent)
    finally:
        host.close()


async def test_failures_become_error_replies_and_other_types_are_left_alone(tmp_path, key, mf):
    host, link = StageHost(tmp_path / "node", NET, key), RecordingLink()
    try:
        ids = np.asarray([1, 2], np.int32)
        fwd = incoming("forward", {"block_range": protocol.block_range_to_wire(rng(mf, 0, 2)), "rows": [row("s", 0, ids)]},
                       session_id="s", tensor=ids)
        assert await host.handle(link, fwd)
        err = link.last()
        assert (err.message_type, err.payload["code"], err.payload["request_id"]) == ("error", "conflict", fwd.request_id)
        assert "holds no blocks" in err.payload["message"]

        await host.load_from_model(mf, rng(mf, 0, 2))
        other = incoming("forward", {"block_range": protocol.block_range_to_wire(rng(mf, 0, 3)), "rows": [row("s", 0, ids)]},
                         session_id="s", tensor=ids)
        await host.handle(link, other)
        assert link.last().payload["code"] == "conflict" and "placement changed" in link.last().payload["message"]

        gap = incoming("forward", {"block_range": protocol.block_range_to_wire(rng(mf, 0, 2)), "rows": [row("s", 5, ids)]},
                       session_id="s", tensor=ids)
        await host.handle(link, gap)
        assert link.last().payload["code"] == "invalid_payload"

        chunk = incoming("blocks_chunk", {"shard_sha256": "ab" * 32, "offset": 0, "sha256": "cd" * 32},
                         session_id="blocks-1", tensor=np.zeros(4, np.uint8))
        await host.handle(link, chunk)
        assert link.last().payload["code"] == "not_found" and "send blocks_offer first" in link.last().payload["message"]

        n = len(link.sent)
        assert await host.handle(link, incoming("status_request")) is False
        assert len(link.sent) == n
    finally:
        host.close()


# --------------------------------------------------------------------------- privacy (issue 13, finding 11)


def int_bytes(ids) -> list[bytes]:
    """The token ids as they would sit in a file: int32 and int64, both byte orders."""
    return [np.asarray(ids, dt).tobytes() for dt in ("<i4", "<i8", ">i4", ">i8")]


async def test_session_files_are_sealed_with_the_network_key_and_hold_no_token_ids(tmp_path, key, mf):
    prompt = FRANCE["prompt_ids"]
    host = await host_for(tmp_path, key, mf, 0, 2)
    try:
        await chain_forward([host], [row("conv-1", 0, prompt)])
        assert await host.session_save("conv-1")
        data = host.session_store.path_for("conv-1").read_bytes()
    finally:
        host.close()
    assert data[:4] == b"AKVS" and b"PK\x03\x04" not in data[:64]  # not a zip/npz archive
    assert not any(b in data for b in int_bytes(prompt))
    n = int.from_bytes(data[5:9], "big")
    head = data[:9 + n]
    meta = json.loads(head[9:])
    assert meta["session_id"] == "conv-1" and meta["n_tokens"] == len(prompt)
    archive = decrypt_blob(key, data[len(head):], session_aad(NET, rng(mf, 0, 2)) + head)
    assert archive[:4] == b"PK\x03\x04"
    with np.load(io.BytesIO(archive)) as z:
        assert z["token_ids"].tolist() == [-1] * len(prompt)  # the first range records digests, not ids
        assert z["digests"].shape == (len(prompt), 16)
    with pytest.raises(Exception):
        decrypt_blob(generate_key(), data[len(head):], session_aad(NET, rng(mf, 0, 2)) + head)
    with pytest.raises(Exception):  # the associated data binds the network
        decrypt_blob(key, data[len(head):], session_aad("net-other", rng(mf, 0, 2)) + head)


@pytest.mark.parametrize("how", ["ciphertext", "header", "other_network"])
async def test_a_tampered_session_file_is_refused_logged_and_recomputed(tmp_path, key, mf, caplog, how):
    prompt = FRANCE["prompt_ids"]
    host = await host_for(tmp_path, key, mf, 0, mf.config.n_block)
    await chain_forward([host], [row("conv-1", 0, prompt)])
    await host.session_save("conv-1")
    path = host.session_store.path_for("conv-1")
    host.close()
    data = bytearray(path.read_bytes())
    network = NET
    if how == "ciphertext":
        data[len(data) // 2] ^= 0x01
    elif how == "header":  # the clear header says something else than was sealed (same length)
        data[:] = bytes(data).replace(b'"saved_at": 17', b'"saved_at": 16', 1)
    else:
        network = "net-elsewhere"  # the same key and directory, another network: the file is not its
    path.write_bytes(bytes(data))

    after = StageHost(tmp_path / "node", network, key)
    await after.load_from_model(mf, rng(mf, 0, mf.config.n_block))
    try:
        with caplog.at_level(logging.WARNING, logger="worker.engine.paged_kv"):
            assert await after.session_query("conv-1", digests_of("conv-1", prompt)) == (0, 0)
        assert "does not open" in caplog.text and not path.exists()
        _TRANSCRIPT.pop("conv-1", None)
        assert await greedy([after], "conv-1", prompt, 6) == FRANCE["greedy_ids"][:6]  # recomputed, same answer
    finally:
        after.close()


async def test_a_later_range_refuses_token_ids_and_keeps_only_digests(tmp_path, key, mf):
    prompt = FRANCE["prompt_ids"]
    first = await host_for(tmp_path, key, mf, 0, 13, name="a")
    last = await host_for(tmp_path, key, mf, 13, mf.config.n_block, name="b")
    try:
        rows = [row("conv-1", 0, prompt)]
        hidden = await first.forward(rows, np.asarray(prompt, np.int32))
        with pytest.raises(ValueError, match="token ids go only to the first blocks"):
            await last.forward(rows, hidden)
        assert last.memory_sessions() == [] and (last.forward_rows, last.token_id_rows) == (1, 1)
        await last.forward(blind(rows), hidden)
        cache = last.stage.session_cache("conv-1")
        assert cache.token_ids == [-1] * len(prompt) and all(isinstance(m, bytes) for m in cache.marks)
        assert await last.session_query("conv-1", digests_of("conv-1", prompt + [5])) == (len(prompt), len(prompt))
        assert await last.session_query("conv-1", digests_of("conv-2", prompt)) == (0, len(prompt))  # another chain
        assert await last.session_save("conv-1")
        data = last.session_store.path_for("conv-1").read_bytes()
        assert not any(b in data for b in int_bytes(prompt))
    finally:
        first.close()
        last.close()


async def test_plaintext_session_files_of_an_earlier_version_are_deleted(tmp_path, key, mf, caplog):
    from worker.engine.paged_kv import SessionPagedKVCache

    host = await host_for(tmp_path, key, mf, 0, 2)
    await chain_forward([host], [row("conv-1", 0, [1, 2, 3])])
    cache = host.stage.session_cache("conv-1")
    plain = host.session_store.path_for("conv-1")
    cache.save_to_disk(plain, "conv-1")  # no sealer: as versions before the fix wrote it
    assert plain.read_bytes()[:4] == b"PK\x03\x04" and isinstance(cache, SessionPagedKVCache)
    host.close()
    with caplog.at_level(logging.WARNING):
        after = await host_for(tmp_path, key, mf, 0, 2)
    try:
        assert not plain.exists() and "conv-1" not in after.session_store
        assert "plaintext" in caplog.text
    finally:
        after.close()
