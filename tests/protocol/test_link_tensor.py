"""Tensor-carrying messages on a real link (worker/link.py): mutual TLS 1.3 WebSockets on 127.0.0.1.

Like the daemon's member link, the worker opens the connection to the admin
(``open_link``) and the admin accepts it (``accept``); both run the full opening
with certificates of one network CA. Then the admin sends ``forward`` (its text
frame, then its binary tensor frame) and the worker answers ``forward_result``.
``Link.send`` must keep each pair together on the wire however many tasks send
at once, and ``Link.recv`` must return the message with its tensor attached, or
answer a frame out of place with an ``error`` and go on.

Also measures the round trip of a one-token hidden state ([1, 576] f32, SmolLM2's
d_model) through forward -> forward_result over TLS loopback (printed, not asserted).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import statistics
import time
from dataclasses import dataclass

import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve

from worker import link as link_module
from tests.support.links import NET, admin_and_worker
from worker import pki, protocol
from worker.link import (
    HandshakeFailed,
    Link,
    LinkClosed,
    accept,
    open_link,
)

D_MODEL = 576  # SmolLM2-135M hidden size
RANGE = {"model_id": "smollm2-135M-32c0b8179c87", "start": 15, "end": 30, "total": 30}
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def members():
    return admin_and_worker("Tensor links")


@dataclass
class Pair:
    """Both ends of one authenticated link: ``admin`` (accepted side) and ``worker`` (opening side)."""

    admin: Link
    worker: Link


@contextlib.asynccontextmanager
async def link_pair(members):
    """A worker -> admin link over wss://127.0.0.1:<free port>, opened with the real handshake."""
    (_, ca_cert), admin_creds, worker_creds = members
    ca_pem = pki.pem(ca_cert)
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(ws):
        try:
            accepted.set_result(await accept(ws, admin_creds, pki.NonceCache()))
        except HandshakeFailed as e:  # surfaces in the test instead of a silent close
            accepted.set_exception(e)
            return
        await done.wait()  # the connection lives as long as the handler

    server_ctx = pki.server_context(pki.pem(admin_creds.cert), admin_creds.key, ca_pem)
    client_ctx = pki.client_context(pki.pem(worker_creds.cert), worker_creds.key, ca_pem)
    async with asyncio.timeout(TIMEOUT_S):
        async with ws_serve(handler, "127.0.0.1", 0, ssl=server_ctx, **protocol.WEBSOCKET_OPTIONS) as server:
            port = server.sockets[0].getsockname()[1]
            async with ws_connect(f"wss://127.0.0.1:{port}/", ssl=client_ctx, proxy=None, open_timeout=TIMEOUT_S,
                                  **protocol.WEBSOCKET_OPTIONS) as ws:
                worker = await open_link(ws, worker_creds, pki.NonceCache(), expected_node_id="admin-1",
                                         expected_role="admin")
                admin = await accepted
                assert (admin.role, worker.role) == ("worker", "admin")  # each side's view of its peer
                try:
                    yield Pair(admin, worker)
                finally:
                    done.set()


def rows_for(session_id: str, start_pos: int, n_tokens: int, token_ids: list[int] | None = None) -> list[dict]:
    """One FORWARD_ROWS item: arbitrary prefix digests, and the token ids when given (the first range only)."""
    digests = protocol.b64(bytes((start_pos + i) % 256 for i in range(16 * n_tokens)))
    return [{"session_id": session_id, "start_pos": start_pos, "n_tokens": n_tokens, "token_ids": token_ids,
             "prefix_digests": digests}]


def forward(session_id: str = "net-1.conv-1", start_pos: int = 0, n_tokens: int = 5,
            token_ids: list[int] | None = None, block_range: dict = RANGE) -> protocol.Message:
    """A valid forward of one row (not sent)."""
    rows = rows_for(session_id, start_pos, n_tokens, token_ids)
    return protocol.make_message("forward", {"block_range": block_range, "rows": rows}, network_id=NET,
                                 session_id=session_id)


async def expect_error(link: Link) -> protocol.Message:
    m = await link.recv(TIMEOUT_S)
    assert m.message_type == "error", m
    return m


# --------------------------------------------------------------------------- a pair arrives whole


async def test_forward_hidden_state_arrives_bit_exact_with_its_message(members):
    x = np.random.default_rng(0).standard_normal((5, D_MODEL)).astype(np.float32)
    async with link_pair(members) as p:
        sent = await p.admin.send_new("forward", {"block_range": RANGE, "rows": rows_for("net-1.conv-1", 0, 5)},
                                      session_id="net-1.conv-1", tensor=x)
        got = await p.worker.recv(TIMEOUT_S)
    assert got == sent and got.message_type == "forward"
    t = got.tensor
    assert (t.request_id, t.session_id) == (sent.request_id, "net-1.conv-1")
    assert t.array.dtype == np.float32 and t.array.shape == (5, D_MODEL)
    assert t.array.tobytes() == x.tobytes()
    assert not t.array.flags.writeable


async def test_forward_result_comes_back_on_the_same_request(members):
    logits = np.linspace(-3, 3, 49152, dtype=np.float32)[None, :]  # last stage: logits [B, vocab]
    async with link_pair(members) as p:
        sent = await p.admin.send_new("forward", {"block_range": RANGE, "rows": rows_for("net-1.conv-1", 0, 1)},
                                      session_id="net-1.conv-1", tensor=np.zeros((1, D_MODEL), np.float32))
        m = await p.worker.recv(TIMEOUT_S)
        await p.worker.reply(m, "forward_result", m.payload, tensor=logits)
        r = await p.admin.recv(TIMEOUT_S)
    assert (r.message_type, r.request_id, r.session_id) == ("forward_result", sent.request_id, "net-1.conv-1")
    assert r.payload == sent.payload and np.array_equal(r.tensor.array, logits)


async def test_token_ids_for_the_first_stage_travel_as_integers(members):
    ids = np.array([1, 9690, 198, 2683], dtype=np.int32)
    async with link_pair(members) as p:
        await p.admin.send(forward(n_tokens=4, token_ids=ids.tolist(), block_range=RANGE | {"start": 0, "end": 15}),
                           tensor=ids)
        got = await p.worker.recv(TIMEOUT_S)
    assert got.tensor.array.dtype == np.int32
    assert got.tensor.array.tolist() == got.payload["rows"][0]["token_ids"] == [1, 9690, 198, 2683]


async def test_block_chunk_arrives_with_its_bytes_and_hash(members):
    data = np.frombuffer(np.random.default_rng(1).bytes(3 << 20), np.uint8)  # 3 MiB of shard
    shard = hashlib.sha256(b"shard").hexdigest()
    async with link_pair(members) as p:
        await p.admin.send_new("blocks_chunk", {"shard_sha256": shard, "offset": 0,
                                                "sha256": hashlib.sha256(data).hexdigest()},
                               session_id="blocks-1", tensor=data)
        m = await p.worker.recv(TIMEOUT_S)
        await p.worker.reply(m, "blocks_status", {"shard_sha256": shard, "have_bytes": m.tensor.array.size,
                                                  "state": "receiving", "message": ""})
        status = await p.admin.recv(TIMEOUT_S)
    assert hashlib.sha256(m.tensor.array).hexdigest() == m.payload["sha256"]
    assert (status.message_type, status.session_id, status.payload["have_bytes"]) == ("blocks_status", "blocks-1",
                                                                                      3 << 20)


async def test_concurrent_senders_never_interleave_pairs(members):
    """50 tasks send at once; tensors of up to 1.2 MB (about 30 MB in all) fill the socket buffers, so
    sends wait for them to drain and other tasks run in between (without the send lock, pairs interleave)."""
    n = 50

    def tensor_of(i: int) -> np.ndarray:  # [n_tokens, d_model], every value names the sender
        return np.full((1 + (i * 37) % 512, D_MODEL), float(i), np.float32)

    async with link_pair(members) as p:
        async def send(i: int) -> str:
            m = forward(f"net-1.conv-{i}", start_pos=i, n_tokens=tensor_of(i).shape[0])
            await p.admin.send(m, tensor=tensor_of(i))
            return m.request_id

        async def receive_all() -> list[protocol.Message]:
            got = []
            with contextlib.suppress(asyncio.TimeoutError):  # a refused pair never arrives
                while len(got) < n:
                    got.append(await p.worker.recv(5.0))
            return got

        sent_ids, received = await asyncio.gather(asyncio.gather(*(send(i) for i in range(n))), receive_all())
        assert (len(received), p.worker.errors) == (n, 0), f"{p.worker.errors} frames were refused as out of place"
    assert sorted(m.request_id for m in received) == sorted(sent_ids)
    for m in received:
        row = m.payload["rows"][0]
        i = row["start_pos"]
        assert m.session_id == row["session_id"] == f"net-1.conv-{i}"
        assert m.tensor.request_id == m.request_id
        assert m.tensor.array.shape == (row["n_tokens"], D_MODEL) and np.array_equal(m.tensor.array, tensor_of(i))


# --------------------------------------------------------------------------- frames out of place


async def test_bare_tensor_frame_is_refused_and_the_link_goes_on(members):
    async with link_pair(members) as p:
        reader = asyncio.create_task(p.worker.recv(TIMEOUT_S))
        await p.admin.ws.send(protocol.encode_tensor(np.ones((1, D_MODEL), np.float32), "net-1.conv-1", 0, "stray-1"))
        err = await expect_error(p.admin)
        good = forward()
        await p.admin.send(good, tensor=np.ones((5, D_MODEL), np.float32))
        got = await reader
    assert err.payload["code"] == "unexpected_message"
    assert "may only follow the message it belongs to" in err.payload["message"]
    assert got.request_id == good.request_id and got.tensor.array.shape == (5, D_MODEL)


async def test_text_frame_where_the_tensor_belongs_is_refused_with_the_forwards_request_id(members):
    async with link_pair(members) as p:
        reader = asyncio.create_task(p.worker.recv(TIMEOUT_S))
        lonely = forward("net-1.conv-9")
        await p.admin.ws.send(protocol.encode_message(lonely))  # its tensor frame never comes ...
        await p.admin.ws.send(protocol.encode_message(protocol.make_message("status_request", network_id=NET)))
        err = await expect_error(p.admin)
        good = forward()
        await p.admin.send(good, tensor=np.zeros((5, D_MODEL), np.float32))
        got = await reader
    assert err.payload["code"] == "unexpected_message" and err.payload["request_id"] == lonely.request_id
    assert "must be followed by its binary tensor frame" in err.payload["message"]
    # both frames of the broken pair are skipped: the status_request is not delivered either
    assert got.message_type == "forward" and got.request_id == good.request_id


@pytest.mark.parametrize("which", ["request", "session"])
async def test_tensor_frame_of_another_request_or_session_is_refused(members, which):
    async with link_pair(members) as p:
        reader = asyncio.create_task(p.worker.recv(TIMEOUT_S))
        m = forward("net-1.conv-1")
        rid, sid = ("someone-else", m.session_id) if which == "request" else (m.request_id, "net-1.conv-2")
        await p.admin.ws.send(protocol.encode_message(m))
        await p.admin.ws.send(protocol.encode_tensor(np.zeros((5, D_MODEL), np.float32), sid, 0, rid))
        err = await expect_error(p.admin)
        good = forward()
        await p.admin.send(good, tensor=np.zeros((5, D_MODEL), np.float32))
        got = await reader
    assert err.payload["code"] == "invalid_payload" and err.payload["request_id"] == m.request_id
    assert "does not match" in err.payload["message"]
    assert got.request_id == good.request_id


async def test_malformed_tensor_frame_after_a_forward_is_refused(members):
    async with link_pair(members) as p:
        reader = asyncio.create_task(p.worker.recv(TIMEOUT_S))
        m = forward()
        frame = protocol.encode_tensor(np.zeros((5, D_MODEL), np.float32), m.session_id, 0, m.request_id)
        await p.admin.ws.send(protocol.encode_message(m))
        await p.admin.ws.send(frame[:-1])  # one data byte short
        err = await expect_error(p.admin)
        good = forward()
        await p.admin.send(good, tensor=np.zeros((5, D_MODEL), np.float32))
        got = await reader
    assert err.payload["code"] == "malformed_frame" and err.payload["request_id"] == m.request_id
    assert got.request_id == good.request_id


async def test_tensor_that_never_follows_times_out_with_an_error(members, monkeypatch):
    monkeypatch.setattr(link_module, "TENSOR_WAIT_S", 0.3)
    async with link_pair(members) as p:
        reader = asyncio.create_task(p.worker.recv(TIMEOUT_S))
        m = forward()
        await p.admin.ws.send(protocol.encode_message(m))
        err = await expect_error(p.admin)
        good = forward()
        await p.admin.send(good, tensor=np.zeros((5, D_MODEL), np.float32))
        got = await reader
    assert err.payload["code"] == "unexpected_message" and err.payload["request_id"] == m.request_id
    assert "did not follow" in err.payload["message"]
    assert got.request_id == good.request_id


async def test_worker_may_not_send_forward(members):
    async with link_pair(members) as p:
        reader = asyncio.create_task(p.admin.recv(TIMEOUT_S))
        m = forward()
        await p.worker.ws.send(protocol.encode_message(m))
        await p.worker.ws.send(protocol.encode_tensor(np.zeros((5, D_MODEL), np.float32), m.session_id, 0,
                                                      m.request_id))
        err = await expect_error(p.worker)
        assert err.payload["code"] == "not_authorized" and "may not send forward" in err.payload["message"]
        # the refused forward's tensor frame is then out of place, and refused on its own
        err2 = await expect_error(p.worker)
        assert "may only follow" in err2.payload["message"]
        reader.cancel()


async def test_send_refuses_a_tensor_message_without_its_tensor_and_vice_versa(members):
    async with link_pair(members) as p:
        with pytest.raises(ValueError, match="forward needs tensor frame"):
            await p.admin.send(forward())
        with pytest.raises(ValueError, match="status_request takes no tensor frame"):
            await p.admin.send(protocol.make_message("status_request", network_id=NET), tensor=np.zeros(1, np.float32))
        with pytest.raises(TypeError):  # float64 is not a wire dtype: nothing is sent
            await p.admin.send(forward(), tensor=np.zeros((5, D_MODEL)))
        good = forward()
        await p.admin.send(good, tensor=np.zeros((5, D_MODEL), np.float32))
        assert (await p.worker.recv(TIMEOUT_S)).request_id == good.request_id
        assert p.worker.errors == 0


async def test_peer_closing_between_message_and_tensor_ends_recv_with_link_closed(members):
    async with link_pair(members) as p:
        reader = asyncio.create_task(p.worker.recv(TIMEOUT_S))
        await p.admin.ws.send(protocol.encode_message(forward()))
        await p.admin.close()
        with pytest.raises(LinkClosed):
            await reader


# --------------------------------------------------------------------------- speed


async def test_round_trip_of_one_token_hidden_state_over_tls_loopback(members):
    """forward [1, 576] f32 -> forward_result [1, 576] f32; median of 500 after 50 warm-up round trips."""
    x = np.random.default_rng(2).standard_normal((1, D_MODEL)).astype(np.float32)
    async with link_pair(members) as p:
        async def echo():
            while True:
                m = await p.worker.recv()
                await p.worker.reply(m, "forward_result", m.payload, tensor=m.tensor.array)

        echo_task = asyncio.create_task(echo())
        times_ms = []
        try:
            for i in range(550):
                t0 = time.perf_counter()
                sent = await p.admin.send_new("forward", {"block_range": RANGE,
                                                          "rows": rows_for("net-1.conv-1", i, 1)},
                                              session_id="net-1.conv-1", tensor=x)
                r = await p.admin.recv(TIMEOUT_S)
                dt_ms = (time.perf_counter() - t0) * 1000
                assert r.request_id == sent.request_id and np.array_equal(r.tensor.array, x)
                if i >= 50:
                    times_ms.append(dt_ms)
        finally:
            echo_task.cancel()
    q = statistics.quantiles(times_ms, n=100)
    print(f"\nforward->forward_result [1, {D_MODEL}] f32 over TLS loopback: median {statistics.median(times_ms):.3f} ms, "
          f"p10 {q[9]:.3f} ms, p90 {q[89]:.3f} ms, p99 {q[98]:.3f} ms (n={len(times_ms)})")
    assert len(times_ms) == 500
