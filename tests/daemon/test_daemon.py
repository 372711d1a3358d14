"""The worker daemon as real processes on loopback: networks, joining, config versions, refusals, fuzzing.

Three ``python -m worker`` processes (an admin and two workers), each with its
own data directory, control port and UDP discovery port on 127.0.0.1. The
tests drive them through their control endpoints (the chat server's path) and
attack the admin's network port and control endpoint directly with real TLS.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import ssl
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.support.daemons import HEARTBEAT_S, start_daemon, wait_for
from worker import netconfig, pki, protocol
from worker.control import ControlError, ControlFiles
from worker.daemon import mentions_revocation
from worker.link import Credentials, HandshakeFailed, Link, open_link

pytestmark = pytest.mark.e2e  # every test here starts processes


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    root = tmp_path_factory.mktemp("network")
    admin = start_daemon(root / "admin", "admin", extra=("--measure-speed",))
    w1 = start_daemon(root / "w1", "w1", discovery_targets=f"127.0.0.1:{admin.discovery}")
    w2 = start_daemon(root / "w2", "w2")
    yield admin, w1, w2
    for d in (w1, w2, admin):
        d.stop()


def _net_dir(d, network_id: str) -> Path:
    return d.data_dir / "networks" / network_id


def _creds(d, network_id: str) -> Credentials:
    nd = _net_dir(d, network_id)
    cert = pki.load_certificate(nd / "node.pem")
    ident = pki.node_identity(cert)
    return Credentials(network_id, ident.node_id, ident.role, cert, pki.load_private_key(nd / "node.key"),
                       pki.load_certificate(nd / "ca.pem"))


def _admin_address(admin, network_id: str) -> str:
    cfg = json.loads(netconfig.path_for(admin.data_dir, network_id).read_text())
    return cfg["config"]["admin"]["address"]


async def _state(d, network_id: str) -> str:
    nets = (await d.call("network_list"))["networks"]
    return next((n["state"] for n in nets if n["network_id"] == network_id), "absent")


async def _join(admin, worker, network_id: str) -> None:
    token = (await admin.call("token_issue", network_id=network_id))["token"]
    result = await worker.call("network_join", token=token)
    assert result["state"] == "pending", result
    pending = (await admin.call("workers_list", network_id=network_id))["pending"]
    assert [p["node_id"] for p in pending] == [worker.node_id]
    assert pending[0]["resources"]["ram_total"] > 0
    assert (await admin.call("worker_approve", network_id=network_id, node_id=worker.node_id))["role"] == "worker"
    await wait_for(lambda: _connected(worker, network_id), what=f"{worker.name} connected")


async def _connected(worker, network_id: str) -> bool:
    return await _state(worker, network_id) == "connected"


@pytest.fixture(scope="module")
def network(procs):
    """A network created on the admin with w1 joined (shared by the refusal tests)."""
    admin, w1, _ = procs

    async def setup():
        net = (await admin.call("network_create", name="refusals"))["network"]
        await _join(admin, w1, net["network_id"])
        return net["network_id"]

    return asyncio.run(setup())


# ---------------------------------------------------------------------------- the whole story


async def test_admin_creates_network_two_workers_join_and_config_versions_propagate(procs):
    admin, w1, w2 = procs
    net = (await admin.call("network_create", name="home lab"))["network"]
    nid = net["network_id"]
    assert net["role"] == "admin" and net["block_count"] == 30 and net["config_version"] == 1
    assert net["model_id"].startswith("smollm2")

    # discovery on loopback: w1 asks the admin's UDP port and learns the network, no secrets
    found = (await w1.call("network_discover", timeout_ms=1000))["found"]
    mine = [f for f in found if f["network_id"] == nid]
    assert mine and mine[0]["name"] == "home lab" and mine[0]["admin_address"] == net["admin_address"]
    assert mine[0]["node_id"] == admin.node_id
    assert not any(k in json.dumps(found) for k in ("argus1.", "PRIVATE KEY", "BEGIN CERTIFICATE"))

    await _join(admin, w1, nid)
    await _join(admin, w2, nid)

    # the joiners hold their certificate, key (owner-only) and the verified config
    for w in (w1, w2):
        nd = _net_dir(w, nid)
        assert (nd / "node.key").stat().st_mode & 0o077 == 0
        ident = pki.node_identity(pki.load_certificate(nd / "node.pem"))
        assert (ident.node_id, ident.role, ident.network_id) == (w.node_id, "worker", nid)
        assert not (nd / "ca.key").exists()

    listing = await wait_for(lambda: _all_online(admin, nid, 2), what="both workers online")
    rows = {w["node_id"]: w for w in listing["workers"]}
    assert set(rows) == {admin.node_id, w1.node_id, w2.node_id}
    assert rows[admin.node_id]["state"] == "self" and rows[admin.node_id]["role"] == "admin"
    for w in (w1, w2):
        row = rows[w.node_id]
        assert row["role"] == "worker" and row["state"] == "online"
        assert row["resources"]["cpu_count"] >= 1 and row["resources"]["ram_total"] > 0
        assert row["allocation"]["ram_bytes"] > 0 and 0 < row["allocation"]["cpu_share"] <= 1

    # a config change: new signed version, acknowledged by both workers
    result = await admin.call("worker_allocate", network_id=nid, node_id=w1.node_id, cpu_share=0.25,
                              ram_bytes=1 << 30, disk_bytes=None)
    version = result["config_version"]
    assert result["allocation"] == {"cpu_share": 0.25, "ram_bytes": 1 << 30,
                                    "disk_bytes": rows[w1.node_id]["allocation"]["disk_bytes"]}

    async def acked():
        v = (await admin.call("network_status", network_id=nid))["versions"]
        return v if v[w1.node_id] == version and v[w2.node_id] == version else None

    await wait_for(acked, what="both workers acknowledge the new version")
    ca = pki.load_certificate(_net_dir(admin, nid) / "ca.pem")
    for w in (w1, w2):
        signed = netconfig.load(netconfig.path_for(w.data_dir, nid), ca)  # verifies the CA signature
        assert signed.version == version
        assert signed.config["members"][w1.node_id]["allocation"]["cpu_share"] == 0.25
    listing = await admin.call("workers_list", network_id=nid)
    assert {w["node_id"]: w["config_version"] for w in listing["workers"]}[w2.node_id] == version

    # an allocation beyond what the worker has is refused in words
    with pytest.raises(ControlError) as err:
        await admin.call("worker_allocate", network_id=nid, node_id=w2.node_id, cpu_share=None,
                         ram_bytes=1 << 50, disk_bytes=None)
    assert err.value.code == "invalid_payload" and "more than this worker has" in err.value.message

    # remove w2: revoked, told, and refused afterwards; w1 gets the new version with the CRL
    w2_creds = _creds(w2, nid)
    removed = await admin.call("worker_remove", network_id=nid, node_id=w2.node_id)
    await wait_for(lambda: _is(w2, nid, "removed"), what="w2 learns it was removed")
    assert w2.node_id not in {w["node_id"] for w in (await admin.call("workers_list", network_id=nid))["workers"]}

    async def w1_has_crl():
        return (await admin.call("network_status", network_id=nid))["versions"][w1.node_id] == removed["config_version"]

    await wait_for(w1_has_crl, what="w1 acknowledges the removal")
    crl = netconfig.load(netconfig.path_for(w1.data_dir, nid), ca).config["crl_pem"]
    assert pki.is_revoked(crl, w2_creds.cert, ca)
    with pytest.raises(HandshakeFailed, match="revoked"):
        await _member_link(_admin_address(admin, nid), w2_creds, admin.node_id)
    events = [e["event"] for e in admin.events() if e.get("network") == nid]
    for name in ("network_created", "join_requested", "join_approved", "config_changed", "config_acked",
                 "member_removed"):
        assert name in events, name

    # the admin restarts: it serves the network again from its files and w1 reconnects
    admin.stop()
    restarted = start_daemon(admin.data_dir, "admin", discovery_port=admin.discovery, extra=("--measure-speed",))
    procs_list = list(procs)
    procs_list[0].proc = restarted.proc
    status = await restarted.call("network_status", network_id=nid)
    assert status["network"]["config_version"] == removed["config_version"]
    await wait_for(lambda: _all_online(restarted, nid, 1), timeout=60, what="w1 back online after the restart")
    # after the restart the revoked certificate is still refused, with the reason in words
    with pytest.raises(HandshakeFailed, match="revoked") as refusal:
        await _member_link(_admin_address(restarted, nid), w2_creds, admin.node_id)
    assert mentions_revocation(refusal.value)  # what the worker's daemon reads to stop retrying

    # w1 leaves: the admin drops it from the member list
    await w1.call("network_leave", network_id=nid)
    assert await _state(w1, nid) == "absent"
    assert not netconfig.path_for(w1.data_dir, nid).exists()

    async def gone():
        workers = (await restarted.call("workers_list", network_id=nid))["workers"]
        return w1.node_id not in {w["node_id"] for w in workers}

    await wait_for(gone, what="the admin drops the member that left")

    # the admin measured its decode speed at start (--measure-speed) and reports it from then on
    async def speed():
        rows = (await restarted.call("workers_list", network_id=nid))["workers"]
        return next(w for w in rows if w["state"] == "self")["resources"].get("speed_tokens_s")

    assert await wait_for(speed, timeout=120, interval=0.5, what="measured speed") > 0


async def _is(d, nid, state):
    return await _state(d, nid) == state


async def _all_online(admin, nid, n):
    listing = await admin.call("workers_list", network_id=nid)
    online = [w for w in listing["workers"] if w["state"] == "online"]
    return listing if len(online) == n else None


# ---------------------------------------------------------------------------- direct connections


async def _member_link(address: str, creds: Credentials, admin_node: str):
    ctx = pki.client_context(creds.cert, creds.key, creds.ca_cert)
    async with connect(f"wss://{address}/", ssl=ctx, open_timeout=10, **protocol.WEBSOCKET_OPTIONS) as ws:
        link = await open_link(ws, creds, pki.NonceCache(), expected_node_id=admin_node, expected_role="admin")
        await link.close()
        return link


def _frame(message_type: str, payload: dict, network_id: str, **kw) -> str:
    return protocol.encode_message(protocol.make_message(message_type, payload, network_id=network_id, **kw))


async def _ask(ws, text) -> protocol.Message:
    await ws.send(text)
    return protocol.decode_message(await asyncio.wait_for(ws.recv(), 10))


async def test_peer_without_certificate_may_only_ask_to_join(procs, network):
    admin, w1, _ = procs
    async with connect(f"wss://{_admin_address(admin, network)}/", ssl=pki.joiner_context(),
                       **protocol.WEBSOCKET_OPTIONS) as ws:
        for mtype, payload in (("hello", {"node_id": "mallory", "role": "worker", "version": "x", "resources": {}}),
                               ("heartbeat", {"resources": {}, "config_version": 1}),
                               ("config_ack", {"version": 2})):
            answer = await _ask(ws, _frame(mtype, payload, network))
            assert answer.message_type == "error" and answer.payload["code"] == "not_authorized", mtype
        answer = await _ask(ws, _frame("join_hello", {}, network))
        assert answer.message_type == "join_ca"
        assert pki.ca_fingerprint(answer.payload["ca_pem"].encode()) == pki.ca_fingerprint(
            pki.load_certificate(_net_dir(admin, network) / "ca.pem"))


def _raw_client_ctx(cert, key) -> ssl.SSLContext:
    """A TLS 1.3 client presenting ``cert`` without checking the server (to test the server's refusal)."""
    ctx = pki.joiner_context()
    with tempfile.TemporaryDirectory() as d:
        pki.save_certificate(Path(d) / "node.pem", cert)
        pki.save_private_key(Path(d) / "node.key", key)
        ctx.load_cert_chain(Path(d) / "node.pem", Path(d) / "node.key")
    return ctx


async def _refused(address: str, ctx: ssl.SSLContext) -> str:
    """Connect and try to talk; return how the server refused (raises if it did not)."""
    try:
        async with connect(f"wss://{address}/", ssl=ctx, open_timeout=10, **protocol.WEBSOCKET_OPTIONS) as ws:
            await ws.send(_frame("join_hello", {}, "x"))
            await asyncio.wait_for(ws.recv(), 10)
    except (ssl.SSLError, ConnectionClosed, InvalidHandshake, OSError) as e:
        return type(e).__name__
    raise AssertionError("the server accepted the connection")


async def test_certificate_of_another_networks_ca_is_refused_in_the_tls_handshake(procs, network):
    admin, _, _ = procs
    other_key, other_ca = pki.create_network_ca("net-other", "other")
    key = pki.new_node_key()
    cert = pki.sign_node_certificate(other_key, other_ca, pki.make_csr(key, "intruder", "net-other"), "intruder", "worker")
    assert await _refused(_admin_address(admin, network), _raw_client_ctx(cert, key))
    assert (await admin.call("network_list"))["node_id"] == admin.node_id  # still serving


async def test_expired_certificate_is_refused(procs, network):
    admin, _, _ = procs
    nd = _net_dir(admin, network)
    ca_key, ca = pki.load_private_key(nd / "ca.key"), pki.load_certificate(nd / "ca.pem")
    key = pki.new_node_key()
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    cert = pki.sign_node_certificate(ca_key, ca, pki.make_csr(key, "old-node", network), "old-node", "worker",
                                     validity_days=1, now=long_ago)
    assert await _refused(_admin_address(admin, network), _raw_client_ctx(cert, key))


async def test_replayed_challenge_response_is_refused(procs, network):
    admin, w1, _ = procs
    creds = _creds(w1, network)
    address = _admin_address(admin, network)
    ctx = pki.client_context(creds.cert, creds.key, creds.ca_cert)
    hello = {"node_id": creds.node_id, "role": "worker", "version": "test", "resources": {}}

    async def replay(ws, signature: bytes) -> protocol.Message:
        """hello → challenge; our challenge; then a recorded response instead of a fresh one."""
        ch = await _ask(ws, _frame("hello", hello, network))
        assert ch.message_type == "challenge"
        await ws.send(_frame("challenge", {"nonce": protocol.b64(pki.make_challenge())}, network))
        return await _ask(ws, _frame("challenge_response", {"signature": protocol.b64(signature)}, network))

    # a genuine opening, recording the signature the worker sent
    async with connect(f"wss://{address}/", ssl=ctx, **protocol.WEBSOCKET_OPTIONS) as ws:
        ch = await _ask(ws, _frame("hello", hello, network))
        server_nonce = protocol.unb64(ch.payload["nonce"])
        client_nonce = pki.make_challenge()
        await ws.send(_frame("challenge", {"nonce": protocol.b64(client_nonce)}, network))
        server_der = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        server_fp = pki.certificate_fingerprint(x509.load_der_x509_certificate(server_der))
        context = pki.challenge_context(network, creds.fingerprint, server_fp, client_nonce, server_nonce)
        recorded = pki.sign_challenge(creds.key, server_nonce, context)
        answer = await _ask(ws, _frame("challenge_response", {"signature": protocol.b64(recorded)}, network))
        assert answer.message_type == "challenge_response"  # accepted: the admin answered in kind

    # the same response replayed on a new connection (new server nonce) is refused and the link closed
    async with connect(f"wss://{address}/", ssl=ctx, **protocol.WEBSOCKET_OPTIONS) as ws:
        answer = await replay(ws, recorded)
        assert answer.message_type == "error" and answer.payload["code"] == "not_authorized"
        assert "challenge" in answer.payload["message"]
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    await wait_for(lambda: _connected(w1, network), what="w1's own link unaffected")


async def test_worker_may_not_send_admin_messages(procs, network):
    admin, w1, _ = procs
    creds = _creds(w1, network)
    address = _admin_address(admin, network)
    ctx = pki.client_context(creds.cert, creds.key, creds.ca_cert)
    try:
        async with connect(f"wss://{address}/", ssl=ctx, **protocol.WEBSOCKET_OPTIONS) as ws:
            link = await open_link(ws, creds, pki.NonceCache(), expected_role="admin")
            cfg = netconfig.load(netconfig.path_for(w1.data_dir, network), creds.ca_cert)
            attempts = [
                ("config_update", {"config": cfg.config, "version": cfg.version + 1, "signature": protocol.b64(b"x" * 64)}),
                ("member_remove", {"node_id": admin.node_id}),
                ("status_request", {}),
                ("join_approved", {"certificate_pem": "-----BEGIN CERTIFICATE-----", "ca_pem": "-----BEGIN CERTIFICATE-----",
                                   "config": {}}),
                ("control", {"command": "network_list", "args": {}}),
            ]
            for mtype, payload in attempts:
                answer = await _ask(ws, _frame(mtype, payload, network))
                assert answer.message_type == "error" and answer.payload["code"] == "not_authorized", mtype
            del link
    finally:
        # this test's link replaced w1's own; w1 reconnects by itself
        await wait_for(lambda: _connected(w1, network), timeout=60, what="w1 reconnects")
    listing = await admin.call("workers_list", network_id=network)
    assert {w["node_id"] for w in listing["workers"]} >= {w1.node_id}
    assert listing["config_version"] == cfg.version  # nothing changed


async def _join_directly(address: str, network: str, token: str, node_id: str) -> protocol.Message:
    key = pki.new_node_key()
    async with connect(f"wss://{address}/", ssl=pki.joiner_context(), **protocol.WEBSOCKET_OPTIONS) as ws:
        return await _ask(ws, _frame("join_request", {
            "token": token, "csr_pem": pki.make_csr(key, node_id, network).decode(), "node_id": node_id,
            "address": "127.0.0.1:9", "resources": {}}, network))


async def test_reused_and_expired_join_tokens_are_refused(procs, network):
    admin, w1, w2 = procs
    address = _admin_address(admin, network)
    token = (await admin.call("token_issue", network_id=network))["token"]
    first = await _join_directly(address, network, token, "first-user")
    assert first.message_type == "join_pending"
    again = await _join_directly(address, network, token, "second-user")
    assert again.message_type == "join_rejected" and "already used" in again.payload["reason"]

    short = (await admin.call("token_issue", network_id=network, ttl_s=1))["token"]
    await asyncio.sleep(1.5)
    late = await _join_directly(address, network, short, "late-user")
    assert late.message_type == "join_rejected" and "expired" in late.payload["reason"]
    with pytest.raises(ControlError, match="expired"):  # the joiner's daemon also says so, without connecting
        await w2.call("network_join", token=short)

    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    bad = await _join_directly(address, network, forged, "forger")
    assert bad.message_type == "join_rejected"
    events = [e for e in admin.events() if e["event"] == "join_rejected" and e.get("network") == network]
    assert len(events) >= 3
    assert "argus1." not in (admin.data_dir / "events.jsonl").read_text()  # tokens never logged


async def test_joiner_refuses_an_admin_whose_ca_differs_from_the_token(procs, network, tmp_path):
    admin, _, w2 = procs
    # a token naming the real admin's address but another CA's fingerprint (as an impostor would present)
    other_key, other_ca = pki.create_network_ca(network, "impostor")
    token = pki.issue_join_token(other_key, network, _admin_address(admin, network), pki.ca_fingerprint(other_ca))
    with pytest.raises(ControlError) as err:
        await w2.call("network_join", token=token)
    assert "CA fingerprint differs" in err.value.message and "not sent" in err.value.message


async def test_control_endpoint_refuses_other_certificates_and_roles(procs, network):
    admin, w1, _ = procs
    endpoint = json.loads(ControlFiles.of(admin.data_dir).endpoint.read_text())
    address = f"127.0.0.1:{endpoint['port']}"
    creds = _creds(w1, network)  # a valid network certificate, but not of the control CA
    assert await _refused(address, _raw_client_ctx(creds.cert, creds.key))
    # the daemon's own server certificate is of the control CA but has role admin, not control
    files = ControlFiles.of(admin.data_dir)
    server = Credentials("control", admin.node_id, "admin", pki.load_certificate(files.server_pem),
                         pki.load_private_key(files.server_key), pki.load_certificate(files.ca_pem))
    ctx = pki.client_context(server.cert, server.key, server.ca_cert)
    async with connect(f"wss://{address}/", ssl=ctx, **protocol.WEBSOCKET_OPTIONS) as ws:
        await open_link(ws, server, pki.NonceCache(), expected_role="admin")
        answer = protocol.decode_message(await asyncio.wait_for(ws.recv(), 10))
        assert answer.message_type == "error" and "only a control client" in answer.payload["message"]


async def test_non_admin_daemon_refuses_admin_commands(procs, network):
    _, w1, _ = procs
    for command, args in (("token_issue", {"network_id": network}),
                          ("worker_remove", {"network_id": network, "node_id": "x"}),
                          ("worker_allocate", {"network_id": network, "node_id": "x", "cpu_share": 0.5})):
        with pytest.raises(ControlError) as err:
            await w1.call(command, **args)
        assert err.value.code == "not_authorized" and "not its admin" in err.value.message


# ---------------------------------------------------------------------------- fuzzing


def _mutate(rng: random.Random, text: str) -> str | bytes:
    data = bytearray(text.encode())
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        i = rng.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[i] = rng.randrange(256)
        elif op == 1:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and data:
            del data[i:i + rng.randint(1, 16)]
        else:
            data[i:i] = rng.choice([b'"', b"{", b"}", b"\\u0000", b"1e999", b"[", b'"payload":', b"null"])
    if rng.random() < 0.2:
        return bytes(data)  # as a binary frame: not a tensor frame either
    return data.decode("utf-8", "replace")


async def _fuzz(address: str, ctx: ssl.SSLContext, seeds: list[str], n: int, rng: random.Random,
                opening=None) -> dict:
    """Send ``n`` random or mutated frames; each must get a reply within 10 s (or the link
    closes after too many errors and we reconnect). Returns reply kinds counted."""
    counts: dict[str, int] = {}
    sent = 0
    while sent < n:
        async with connect(f"wss://{address}/", ssl=ctx, **protocol.WEBSOCKET_OPTIONS) as ws:
            if opening is not None:
                await opening(ws)
            try:
                while sent < n:
                    r = rng.random()
                    if r < 0.1:
                        frame = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
                    elif r < 0.2:
                        frame = "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randint(0, 64)))
                    else:
                        frame = _mutate(rng, rng.choice(seeds))
                    await ws.send(frame)
                    sent += 1
                    reply = protocol.decode_message(await asyncio.wait_for(ws.recv(), 10))
                    kind = reply.payload["code"] if reply.message_type == "error" else reply.message_type
                    counts[kind] = counts.get(kind, 0) + 1
            except ConnectionClosed as e:
                assert e.rcvd is not None and e.rcvd.code == 1008, e  # closed on purpose, after too many errors
    return counts


async def test_ten_thousand_random_and_mutated_frames_get_error_replies(procs, network):
    admin, _, _ = procs
    rng = random.Random(20261121)
    address = _admin_address(admin, network)
    seeds = [_frame("join_hello", {}, network),
             _frame("hello", {"node_id": "n1", "role": "worker", "version": "1", "resources": {"a": 1}}, network),
             _frame("heartbeat", {"resources": {}, "config_version": 1}, network)]
    counts = await _fuzz(address, pki.joiner_context(), seeds, 6000, rng)
    assert counts.get("malformed_frame", 0) > 1000 and counts.get("not_authorized", 0) > 0

    # and on the control endpoint, as an authenticated control client
    files = ControlFiles.of(admin.data_dir)
    endpoint = json.loads(files.endpoint.read_text())
    creds = Credentials("control", "control-client", "control", pki.load_certificate(files.client_pem),
                        pki.load_private_key(files.client_key), pki.load_certificate(files.ca_pem))

    async def opening(ws):
        await open_link(ws, creds, pki.NonceCache(), expected_role="admin")

    control_seeds = [_frame("control", {"command": "network_list", "args": {}}, "control"),
                     _frame("control", {"command": "events", "args": {"network_id": None, "limit": 5}}, "control")]
    counts = await _fuzz(f"127.0.0.1:{endpoint['port']}", pki.client_context(creds.cert, creds.key, creds.ca_cert),
                         control_seeds, 4000, rng, opening)
    assert counts.get("malformed_frame", 0) > 500
    # the daemon is alive and unchanged
    assert (await admin.call("network_status", network_id=network))["network"]["network_id"] == network
    assert admin.proc.poll() is None
