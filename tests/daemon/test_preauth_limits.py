"""Issue 13, findings 9 and 10: what an unauthenticated peer can make a running daemon spend.

A real ``python -m worker`` admin (and one worker that joined it) on loopback, attacked
the way an outsider would: raw TLS WebSockets to the network port and to the control
endpoint. Before authentication a frame may be at most 64 KiB (close 1009, nothing
buffered), the opening and a join conversation have deadlines, connections not yet
authenticated are capped per address and in total (HTTP 503), and refusals are
rate-limited in the event log so that they cannot rotate legitimate events out.

Flood connections come from other loopback addresses (127.0.0.2 …, bound as the
source; still sent to 127.0.0.1), so the legitimate member and joiner on 127.0.0.1
are a different address, as on a LAN.
"""
from __future__ import annotations

import asyncio
import json
import time

import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.daemons import start_daemon, wait_for
from worker import netconfig, pki, protocol
from worker.control import ControlFiles
from worker.eventlog import LIMIT_PER_SOURCE
from worker.link import Credentials, open_link
from worker.protocol.limits import (
    HANDSHAKE_DEADLINE_S,
    JOIN_CONVERSATION_S,
    MAX_PREAUTH_FRAME_BYTES,
    MAX_PREAUTH_PER_ADDRESS,
    MAX_PREAUTH_TOTAL,
)

pytestmark = pytest.mark.e2e  # every test here starts processes

MiB = 1 << 20


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preauth")
    admin = start_daemon(root / "admin", "admin")
    w1 = start_daemon(root / "w1", "w1")
    yield admin, w1
    for d in (w1, admin):
        d.stop()


@pytest.fixture(scope="module")
def network(procs):
    """A network on the admin with w1 joined and connected."""
    admin, w1 = procs

    async def setup():
        nid = (await admin.call("network_create", name="limits"))["network"]["network_id"]
        token = (await admin.call("token_issue", network_id=nid))["token"]
        assert (await w1.call("network_join", token=token))["state"] == "pending"
        await admin.call("worker_approve", network_id=nid, node_id=w1.node_id)
        await wait_for(lambda: _connected(w1, nid), what="w1 connected")
        return nid

    return asyncio.run(setup())


async def _connected(worker, network_id: str) -> bool:
    nets = (await worker.call("network_list"))["networks"]
    return any(n["network_id"] == network_id and n["state"] == "connected" for n in nets)


def _address(admin, network_id: str) -> str:
    return json.loads(netconfig.path_for(admin.data_dir, network_id).read_text())["config"]["admin"]["address"]


def _creds(d, network_id: str) -> Credentials:
    nd = d.data_dir / "networks" / network_id
    cert = pki.load_certificate(nd / "node.pem")
    ident = pki.node_identity(cert)
    return Credentials(network_id, ident.node_id, ident.role, cert, pki.load_private_key(nd / "node.key"),
                       pki.load_certificate(nd / "ca.pem"))


def _control(admin) -> tuple[str, Credentials]:
    files = ControlFiles.of(admin.data_dir)
    port = json.loads(files.endpoint.read_text())["port"]
    creds = Credentials("control", "control-client", "control", pki.load_certificate(files.client_pem),
                        pki.load_private_key(files.client_key), pki.load_certificate(files.ca_pem))
    return f"127.0.0.1:{port}", creds


def _frame(message_type: str, payload: dict, network_id: str) -> str:
    return protocol.encode_message(protocol.make_message(message_type, payload, network_id=network_id))


async def _ask(ws, text) -> protocol.Message:
    await ws.send(text)
    return protocol.decode_message(await asyncio.wait_for(ws.recv(), 10))


async def _closed_by_server(ws, timeout: float = 15):
    """Read until the server closes; return the close frame it sent (code, reason)."""
    with pytest.raises(ConnectionClosed) as err:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    assert err.value.rcvd is not None, err.value
    return err.value.rcvd


def _open(address: str, ctx, source: str = "127.0.0.1", **kw):
    return connect(f"wss://{address}/", ssl=ctx, open_timeout=20, local_addr=(source, 0),
                   **protocol.WEBSOCKET_OPTIONS, **kw)


async def _send_big(ws, n_bytes: int = MiB):
    """Send one text frame of ``n_bytes``; the server may close before it has all of it."""
    try:
        await ws.send("x" * n_bytes)
    except ConnectionClosed:
        pass
    return await _closed_by_server(ws)


def _rss(d) -> int:
    return psutil.Process(d.proc.pid).memory_info().rss


# ---------------------------------------------------------------------------- frame size


async def test_a_large_frame_before_authentication_is_refused_from_its_header(procs, network):
    admin, w1 = procs
    address = _address(admin, network)

    async def as_joiner():
        async with _open(address, pki.joiner_context(), "127.0.0.5") as ws:
            return await _send_big(ws)

    before = _rss(admin)
    for _ in range(4):  # 4 rounds of the per-address cap's worth of 1 MiB frames at once
        for rcvd in await asyncio.gather(*(as_joiner() for _ in range(MAX_PREAUTH_PER_ADDRESS))):
            assert rcvd.code == 1009 and str(MAX_PREAUTH_FRAME_BYTES) in rcvd.reason, rcvd
    grown = _rss(admin) - before
    assert grown < 24 * MiB, f"the daemon grew by {grown / MiB:.1f} MiB while refusing 32 MiB of frames"

    # a member in its opening (certificate checked by TLS, signature not yet) is held to the same limit
    creds = _creds(w1, network)
    async with _open(address, pki.client_context(creds.cert, creds.key, creds.ca_cert)) as ws:
        ch = await _ask(ws, _frame("hello", {"node_id": creds.node_id, "role": "worker", "version": "t",
                                             "resources": {}}, network))
        assert ch.message_type == "challenge"
        assert (await _send_big(ws)).code == 1009

    # and so is the control endpoint (127.0.0.1), before its opening
    control_address, control_creds = _control(admin)
    control_ctx = pki.client_context(control_creds.cert, control_creds.key, control_creds.ca_cert)
    async with _open(control_address, control_ctx) as ws:
        assert (await _send_big(ws)).code == 1009

    # after authentication the usual limits apply: a 256 KiB frame is read and answered
    async with _open(control_address, control_ctx) as ws:
        await open_link(ws, control_creds, pki.NonceCache(), expected_role="admin")
        answer = await _ask(ws, "{" + " " * (256 << 10) + "}")
        assert answer.message_type == "error" and answer.payload["code"] != "frame_too_large", answer.payload
        ok = await _ask(ws, _frame("control", {"command": "network_list", "args": {}}, "control"))
        assert ok.message_type == "control_result"
    assert admin.proc.poll() is None


# ---------------------------------------------------------------------------- connection caps


async def _try_open(address: str, ctx, source: str):
    try:
        return await _open(address, ctx, source)
    except InvalidStatus as e:
        return e


async def _close_all(conns) -> None:
    await asyncio.gather(*(c.close() for c in conns if not isinstance(c, Exception)), return_exceptions=True)


async def _join_and_approve(admin, network_id: str, node_id: str) -> protocol.Message:
    """A real join on one connection from 127.0.0.1: join_hello, join_request, pending, approval."""
    address = _address(admin, network_id)
    token = (await admin.call("token_issue", network_id=network_id))["token"]
    key = pki.new_node_key()
    async with _open(address, pki.joiner_context()) as ws:
        assert (await _ask(ws, _frame("join_hello", {}, network_id))).message_type == "join_ca"
        pending = await _ask(ws, _frame("join_request", {
            "token": token, "csr_pem": pki.make_csr(key, node_id, network_id).decode(), "node_id": node_id,
            "address": "127.0.0.1:9", "resources": {}}, network_id))
        assert pending.message_type == "join_pending", pending.payload
        await admin.call("worker_approve", network_id=network_id, node_id=node_id)
        return protocol.decode_message(await asyncio.wait_for(ws.recv(), 15))


async def test_unauthenticated_connections_past_the_caps_are_refused_while_members_and_joins_work(procs, network):
    admin, w1 = procs
    address = _address(admin, network)
    joiner = pki.joiner_context()

    flood = await asyncio.gather(*(_try_open(address, joiner, "127.0.0.2") for _ in range(100)))
    held = [c for c in flood if not isinstance(c, Exception)]
    refused = [c for c in flood if isinstance(c, InvalidStatus)]
    try:
        assert len(held) == MAX_PREAUTH_PER_ADDRESS and len(refused) == 100 - MAX_PREAUTH_PER_ADDRESS
        assert refused[0].response.status_code == 503
        assert b"127.0.0.2 are not authenticated yet" in refused[0].response.body

        # meanwhile, from another address: a real join is approved, a member authenticates
        approved = await _join_and_approve(admin, network, "late-joiner")
        assert approved.message_type == "join_approved"
        creds = _creds(w1, network)
        async with _open(address, pki.client_context(creds.cert, creds.key, creds.ca_cert)) as ws:
            link = await open_link(ws, creds, pki.NonceCache(), expected_node_id=admin.node_id, expected_role="admin")
            assert link.role == "admin"
            answer = await _ask(ws, "{" + " " * (256 << 10) + "}")  # authenticated: past 64 KiB is read
            assert answer.message_type == "error" and answer.payload["code"] != "frame_too_large", answer.payload

        # joiners from many addresses: at most MAX_PREAUTH_TOTAL of them at once, members still get in
        sources = [f"127.0.0.{i}" for i in range(3, 3 + MAX_PREAUTH_TOTAL // MAX_PREAUTH_PER_ADDRESS)]
        more = await asyncio.gather(*(_try_open(address, joiner, s) for s in sources
                                      for _ in range(MAX_PREAUTH_PER_ADDRESS)))
        flood += more
        over = [c for c in more if isinstance(c, InvalidStatus)]
        assert len(over) == MAX_PREAUTH_PER_ADDRESS  # the first address already holds its share
        assert b"at most %d" % MAX_PREAUTH_TOTAL in over[0].response.body
        async with _open(address, pki.client_context(creds.cert, creds.key, creds.ca_cert)) as ws:
            await open_link(ws, creds, pki.NonceCache(), expected_node_id=admin.node_id, expected_role="admin")
    finally:
        await _close_all(flood)
    # this test's member links replaced w1's own; w1 reconnects by itself, and a joiner is welcome again
    await wait_for(lambda: _connected(w1, network), timeout=60, what="w1 reconnects")
    async with _open(address, joiner) as ws:
        assert (await _ask(ws, _frame("join_hello", {}, network))).message_type == "join_ca"
    assert admin.proc.poll() is None


# ---------------------------------------------------------------------------- deadlines


async def _keep_talking(address: str, network_id: str, source: str, frame: str):
    """Send ``frame`` every 2 s, never a join_request; return (seconds until closed, close frame)."""
    started = time.monotonic()
    async with _open(address, pki.joiner_context(), source) as ws:
        with pytest.raises(ConnectionClosed) as err:
            while True:
                await ws.send(frame)
                await asyncio.sleep(2)
                while True:  # drain the answers (join_ca, errors) without waiting for any
                    try:
                        await asyncio.wait_for(ws.recv(), 0.01)
                    except TimeoutError:
                        break
    return time.monotonic() - started, err.value.rcvd


async def test_a_joiner_that_never_asks_to_join_is_cut_off_at_the_deadline(procs, network):
    admin, _ = procs
    address = _address(admin, network)
    hello = _frame("join_hello", {}, network)  # the first is answered join_ca, the next ones unexpected_message
    error = _frame("error", {"code": "internal", "message": "still here", "request_id": None}, network)  # valid from a joiner, ignored
    results = await asyncio.gather(_keep_talking(address, network, "127.0.0.6", hello),
                                   _keep_talking(address, network, "127.0.0.7", error))
    for elapsed, rcvd in results:
        assert rcvd is not None and rcvd.code == 1008 and "no join request within" in rcvd.reason, rcvd
        assert JOIN_CONVERSATION_S - 1 <= elapsed <= JOIN_CONVERSATION_S + 15, elapsed


async def test_a_member_that_stalls_its_opening_is_cut_off_at_the_deadline(procs, network):
    admin, w1 = procs
    creds = _creds(w1, network)
    started = time.monotonic()
    async with _open(_address(admin, network), pki.client_context(creds.cert, creds.key, creds.ca_cert)) as ws:
        ch = await _ask(ws, _frame("hello", {"node_id": creds.node_id, "role": "worker", "version": "t",
                                             "resources": {}}, network))
        assert ch.message_type == "challenge"
        answer = protocol.decode_message(await asyncio.wait_for(ws.recv(), HANDSHAKE_DEADLINE_S + 10))
        assert answer.message_type == "error" and "took longer than" in answer.payload["message"]
        assert (await _closed_by_server(ws)).code == 1008
    assert time.monotonic() - started <= HANDSHAKE_DEADLINE_S + 10


# ---------------------------------------------------------------------------- the event log (runs last: stops the admin)


async def test_a_thousand_bad_join_attempts_leave_a_bounded_trace_and_legitimate_events_survive(procs, network):
    admin, _ = procs
    address = _address(admin, network)
    token = (await admin.call("token_issue", network_id=network))["token"]
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    key = pki.new_node_key()
    request = _frame("join_request", {"token": forged, "csr_pem": pki.make_csr(key, "forger", network).decode(),
                                      "node_id": "forger", "address": "127.0.0.1:9", "resources": {}}, network)
    attempts = 1000
    todo = iter(range(attempts))
    rejected = 0

    async def attacker():
        nonlocal rejected
        for _ in todo:
            while True:
                try:
                    async with _open(address, pki.joiner_context(), "127.0.0.9") as ws:
                        answer = await _ask(ws, request)
                    break
                except InvalidStatus:  # over the per-address cap for a moment: the server still closes the last
                    await asyncio.sleep(0.05)
            assert answer.message_type == "join_rejected"
            rejected += 1

    await asyncio.gather(*(attacker() for _ in range(4)))
    assert rejected == attempts

    # legitimate events after the flood: an approval and a config change
    assert (await _join_and_approve(admin, network, "after-flood")).message_type == "join_approved"
    changed = await admin.call("network_set", network_id=network, auto_approve=True)
    del changed

    def lines(name: str, **match) -> list[dict]:
        return [e for e in admin.events() if e["event"] == name
                and all(e["details"].get(k) == v for k, v in match.items())]

    written = lines("join_rejected", source="127.0.0.9")
    assert len(written) <= LIMIT_PER_SOURCE  # (fewer when other addresses used up the window's total)
    assert [e for e in lines("join_approved") if e["node"] == "after-flood"]
    assert lines("config_changed")[-1]["time"] >= written[-1]["time"]

    # the window's summary says how many were left out (written at the latest when the daemon stops)
    admin.stop()
    summaries = lines("events_suppressed", source="127.0.0.9")
    assert summaries, "no events_suppressed summary for the flooding address"
    dropped = sum(s["details"]["suppressed"].get("join_rejected", 0) for s in summaries)
    assert len(written) + dropped == attempts
    log_files = sorted(p.name for p in admin.data_dir.glob("events.jsonl*"))
    assert log_files == ["events.jsonl"] and (admin.data_dir / "events.jsonl").stat().st_size < 256 << 10
